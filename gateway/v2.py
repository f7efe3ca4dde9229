"""Open Inference Protocol (KServe v2) request checks: what JSON Schema cannot say.

A v2 infer body can be well-formed JSON and still be a request no model can
run: a ``shape`` whose product is not the number of values, an ``FP32`` tensor
carrying strings, an ``INT8`` value of 300, two inputs with one name, or inputs
the model never declared. Backends disagree on what to do with such bodies
(truncate, pad, cast, crash with a 500), so the gateway refuses them with a 400
that names the JSON pointer of the first bad value.

Tensor data may be flat (row-major) or nested; nested data must be
rectangular, and its values are checked against the datatype with C-speed
builtins (``set(map(type, ...))``, ``min``/``max``) so a 64-float request costs
a few microseconds. Floats are refused outside the datatype's range (an FP16
value of 1e6 would reach the model as infinity).

Declared inputs (``models.X.inputs`` or the local runner's metadata) are
matched exactly: every declared input present, no undeclared one, the same
datatype, the same rank, and each dimension equal unless the declaration says
-1 (a variable dimension, usually the batch).
"""

from __future__ import annotations

import math
from array import array as pyarray
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, Any, NoReturn, Sequence, cast

import numpy as np

from .config import TensorSpec
from .errors import InvalidRequest

from .v2_binary import as_numbers

if TYPE_CHECKING:
    from .v2_binary import BinaryInputs

MAX_RANK = 32  # dimensions in one shape (numpy's own limit is 32 on older versions, 64 on newer)
_NUMBERS = frozenset({int, float})
_SMALL_TENSOR = 256  # up to this many values: a type set over the list, then one conversion
_FEW_SUSPECTS = 64  # values equal to 0 or 1 checked one by one for being a bool; past this, the whole list


@dataclass(frozen=True, slots=True)
class Datatype:
    """A v2 tensor datatype: the JSON value types it accepts and its value range."""

    types: frozenset[type]
    low: float | None = None
    high: float | None = None
    noun: str = "numbers"


def _int(bits: int, signed: bool) -> Datatype:
    if signed:
        return Datatype(frozenset({int}), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, "integers")
    return Datatype(frozenset({int}), 0, 2**bits - 1, "integers")


DATATYPES: dict[str, Datatype] = {
    "BOOL": Datatype(frozenset({bool}), noun="booleans"),
    "UINT8": _int(8, False),
    "UINT16": _int(16, False),
    "UINT32": _int(32, False),
    "UINT64": _int(64, False),
    "INT8": _int(8, True),
    "INT16": _int(16, True),
    "INT32": _int(32, True),
    "INT64": _int(64, True),
    "FP16": Datatype(_NUMBERS, -65504.0, 65504.0),
    "FP32": Datatype(_NUMBERS, -3.4028234663852886e38, 3.4028234663852886e38),
    "FP64": Datatype(_NUMBERS),  # the parser already refuses non-finite numbers
    "BYTES": Datatype(frozenset({str}), noun="strings"),
}
# BF16 has no JSON form in the protocol (no numpy type either): it travels only as binary data
ALL_DATATYPES = (*DATATYPES, "BF16")
# parameters that point the server at memory the gateway cannot see: never forwarded
SHARED_MEMORY = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


class RequestViolation(InvalidRequest):
    """A request that breaks a protocol rule. ``reason`` is a short label for metrics."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def check_infer_request(body: Any, declared: Sequence[TensorSpec] | None = None,
                        arrays: dict[str, np.ndarray] | None = None, binary: BinaryInputs | None = None) -> None:
    """Raise ``RequestViolation`` unless ``body`` is a runnable v2 infer request.

    Given ``arrays``, each floating-point input's values are left there as the
    float64 array the range check built (flat, row-major, by input name), so a
    local backend does not convert the same numbers a second time; a binary
    input's values are left there as decoded (flat, their own dtype).
    ``binary`` holds the bytes after a binary request's JSON header (``body``
    is then that header): an input with ``parameters.binary_data_size`` takes
    its values from there, and every byte must belong to some input.
    """
    if type(body) is not dict:
        raise RequestViolation("(root): must be an object (a v2 infer request)", "v2_body")
    if "id" in body and type(body["id"]) is not str:
        raise RequestViolation("/id: must be a string", "v2_body")
    if "parameters" in body and type(body["parameters"]) is not dict:
        raise RequestViolation("/parameters: must be an object", "v2_body")
    inputs = body.get("inputs")
    if type(inputs) is not list or not inputs:
        raise RequestViolation("/inputs: must be a non-empty list of input tensors", "v2_body")
    names: dict[str, int] = {}
    for i, tensor in enumerate(inputs):
        name = _check_tensor(tensor, f"/inputs/{i}", arrays, binary)
        if name in names:
            raise RequestViolation(f"/inputs/{i}/name: duplicate input name {_show(name)}", "v2_duplicate_input")
        names[name] = i
    if binary is not None:
        binary.finish()
    _check_outputs(body.get("outputs"))
    if declared is not None:
        _match_declared(inputs, names, declared)


def _check_tensor(tensor: Any, where: str, arrays: dict[str, np.ndarray] | None = None,
                  binary: BinaryInputs | None = None) -> str:
    if type(tensor) is not dict:
        raise RequestViolation(f"{where}: must be an object (name, shape, datatype, data)", "v2_body")
    name = tensor.get("name")
    if type(name) is not str or not name:
        raise RequestViolation(f"{where}/name: must be a non-empty string", "v2_body")
    if "parameters" in tensor:
        params = tensor["parameters"]
        _check_parameters(params, f"{where}/parameters")
        if "binary_data_size" in params:
            return _check_binary(tensor, name, where, params["binary_data_size"], arrays, binary)
    shape = tensor.get("shape")
    if (
        type(shape) is not list
        or len(shape) > MAX_RANK
        or any(type(d) is not int or d < 0 for d in shape)
    ):
        raise RequestViolation(
            f"{where}/shape: must be a list of at most {MAX_RANK} non-negative integers", "v2_shape"
        )
    datatype = tensor.get("datatype")
    spec = DATATYPES.get(datatype) if type(datatype) is str else None
    if spec is None:
        if datatype == "BF16":
            raise RequestViolation(f"{where}/datatype: BF16 is sent only as binary data "
                                   "(parameters.binary_data_size with Inference-Header-Content-Length)", "v2_datatype")
        raise RequestViolation(
            f"{where}/datatype: must be one of {', '.join(DATATYPES)}", "v2_datatype"
        )
    if "data" not in tensor:
        raise RequestViolation(f"{where}/data: is required (or parameters.binary_data_size, for binary data)", "v2_body")
    data = tensor["data"]
    if type(data) is not list:
        raise RequestViolation(f"{where}/data: must be a list of {datatype} values", "v2_datatype")
    values, dims = _flatten(data, f"{where}/data")
    expected = math.prod(shape)
    if len(values) != expected:
        raise RequestViolation(
            f"{where}/data: has {len(values)} values but shape {shape} needs {expected}", "v2_shape_mismatch"
        )
    array = _check_values(values, dims, spec, cast(str, datatype), f"{where}/data")  # a known name: spec is set
    if arrays is not None and array is not None:
        arrays[name] = array
    return name


def _check_parameters(params: Any, where: str) -> None:
    if type(params) is not dict:
        raise RequestViolation(f"{where}: must be an object", "v2_body")
    for key in SHARED_MEMORY:
        if key in params:
            raise RequestViolation(f"{where}/{key}: shared memory is not accepted through the gateway "
                                   "(it cannot check what it cannot see); send the data in the request",
                                   "v2_shared_memory")


def _check_binary(tensor: dict[str, Any], name: str, where: str, size: Any, arrays: dict[str, np.ndarray] | None,
                  binary: BinaryInputs | None) -> str:
    """An input whose values are binary data: shape and datatype as for JSON, the bytes from ``binary``."""
    if binary is None:
        raise RequestViolation(f"{where}/parameters/binary_data_size: binary data needs the "
                               "Inference-Header-Content-Length header (the request is all JSON)", "v2_binary")
    if "data" in tensor:
        raise RequestViolation(f"{where}: has both data and parameters.binary_data_size", "v2_binary")
    shape = tensor.get("shape")
    if type(shape) is not list or len(shape) > MAX_RANK or any(type(d) is not int or d < 0 for d in shape):
        raise RequestViolation(
            f"{where}/shape: must be a list of at most {MAX_RANK} non-negative integers", "v2_shape"
        )
    datatype = tensor.get("datatype")
    if datatype not in ALL_DATATYPES:
        raise RequestViolation(f"{where}/datatype: must be one of {', '.join(ALL_DATATYPES)}", "v2_datatype")
    values = binary.take(where, name, datatype, shape, size)
    if arrays is not None:  # numbers as numbers (BF16 widened to FP32, BOOL as bool); BYTES as bytes objects
        arrays[name] = as_numbers(values, datatype)
    return name


def _flatten(data: list[Any], where: str) -> tuple[list[Any], list[int]]:
    """Row-major values of (possibly nested) ``data`` and its nested dimensions; nesting must be rectangular."""
    dims = [len(data)]
    level = data
    while level and type(level[0]) is list:
        width = len(level[0])
        if any(type(row) is not list or len(row) != width for row in level):
            raise RequestViolation(f"{where}: nested data must be rectangular (equal-length lists)", "v2_shape_mismatch")
        dims.append(width)
        level = list(chain.from_iterable(level))
    return level, dims


def _check_values(values: list[Any], dims: list[int], spec: Datatype, datatype: str,
                  where: str) -> np.ndarray | None:
    """Type and range of every value; for floating-point datatypes, the values as a float64 array."""
    if not values:
        return None
    array = None
    if spec.types is _NUMBERS:  # floats: one C conversion, then min/max over the array (~3x faster than on the list)
        try:
            array = _float_array(values)
        except OverflowError:  # an integer beyond any float: out of range whatever the datatype
            within = False
        else:
            if array is None:
                _refuse_type(values, dims, spec, datatype, where)
            within = spec.low is None or spec.high is None or bool(spec.low <= array.min() and array.max() <= spec.high)
    else:
        if not set(map(type, values)) <= spec.types:
            _refuse_type(values, dims, spec, datatype, where)
        if spec.low is not None and spec.high is not None:
            within = spec.low <= min(values) and max(values) <= spec.high
        else:
            within = True
    if not within:
        index = next(i for i, v in enumerate(values) if not _within(v, spec))
        low = "-inf" if spec.low is None else _num(spec.low)
        high = "inf" if spec.high is None else _num(spec.high)
        raise RequestViolation(f"{where}{_pointer(index, dims)}: out of range for {datatype} [{low}, {high}]",
                               "v2_range")
    return array


def _float_array(values: list[Any]) -> np.ndarray | None:
    """``values`` as float64 when every one is an int or a float (a bool is not), else None.

    ``array.array("d", ...)`` converts in one C pass and refuses strings, nulls,
    lists and objects (TypeError), but takes booleans as 0.0 and 1.0; so only
    the values that came out as exactly 0 or 1 are looked at again. This is
    ~2x cheaper than a type set over the whole list plus a separate conversion.
    OverflowError (an integer beyond any float) is the caller's to handle.
    """
    if len(values) <= _SMALL_TENSOR:  # numpy's fixed costs outweigh a Python pass over a few values
        if not set(map(type, values)) <= _NUMBERS:
            return None
        return np.array(values, dtype=np.float64)
    try:
        array = np.frombuffer(pyarray("d", values), dtype=np.float64)
    except TypeError:
        return None
    suspects = np.flatnonzero((array == 0.0) | (array == 1.0))
    if suspects.size:
        maybe = values if suspects.size > _FEW_SUSPECTS else [values[i] for i in suspects.tolist()]
        if bool in set(map(type, maybe)):
            return None
    return array


def _refuse_type(values: list[Any], dims: list[int], spec: Datatype, datatype: str, where: str) -> NoReturn:
    index = next(i for i, v in enumerate(values) if type(v) not in spec.types)
    raise RequestViolation(f"{where}{_pointer(index, dims)}: must be {datatype} ({spec.noun})", "v2_datatype")


def _within(value: int | float, spec: Datatype) -> bool:
    try:
        number = float(value)
    except OverflowError:
        return False
    return spec.low is None or spec.high is None or spec.low <= number <= spec.high


def _check_outputs(outputs: Any) -> None:
    if outputs is None:
        return
    if type(outputs) is not list:
        raise RequestViolation("/outputs: must be a list of requested outputs", "v2_body")
    seen: set[str] = set()
    for i, output in enumerate(outputs):
        name = output.get("name") if type(output) is dict else None
        if type(name) is not str or not name:
            raise RequestViolation(f"/outputs/{i}/name: must be a non-empty string", "v2_body")
        if "parameters" in output:
            _check_parameters(output["parameters"], f"/outputs/{i}/parameters")
        if name in seen:
            raise RequestViolation(f"/outputs/{i}/name: duplicate output name {_show(name)}", "v2_body")
        seen.add(name)


def _match_declared(inputs: list[dict[str, Any]], names: dict[str, int], declared: Sequence[TensorSpec]) -> None:
    by_name = {spec.name: spec for spec in declared}
    for name, i in names.items():
        spec = by_name.get(name)
        if spec is None:
            raise RequestViolation(
                f"/inputs/{i}/name: the model has no input {_show(name)} (it declares {', '.join(sorted(by_name))})",
                "v2_undeclared_input",
            )
        tensor = inputs[i]
        if tensor["datatype"] != spec.datatype:
            raise RequestViolation(
                f"/inputs/{i}/datatype: must be {spec.datatype} for input {_show(name)}", "v2_declared_datatype"
            )
        shape = tensor["shape"]
        if len(shape) != len(spec.shape) or any(want not in (-1, got) for want, got in zip(spec.shape, shape)):
            raise RequestViolation(
                f"/inputs/{i}/shape: {shape} does not match the declared shape {list(spec.shape)} "
                "(-1 is any size)",
                "v2_declared_shape",
            )
    missing = [spec.name for spec in declared if spec.name not in names]
    if missing:
        raise RequestViolation(f"/inputs: missing declared input {_show(missing[0])}", "v2_missing_input")


def _pointer(index: int, dims: list[int]) -> str:
    """JSON pointer suffix of the ``index``-th row-major value in data nested as ``dims``."""
    if len(dims) == 1:
        return f"/{index}"
    parts = []
    for size in reversed(dims):
        index, rest = divmod(index, size)
        parts.append(rest)
    return "".join(f"/{p}" for p in reversed(parts))


def _show(text: str, limit: int = 40) -> str:
    """A client-supplied string, quoted and cut short: messages never echo large input back."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e20 else f"{x:g}"
