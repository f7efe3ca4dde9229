"""The binary tensor extension of the Open Inference Protocol: read, check and write it.

``tritonclient.http`` sends every input as raw bytes by default and asks for
binary outputs: a body of N bytes of JSON (``Inference-Header-Content-Length:
N``) followed by each binary tensor's little-endian bytes, in input order, each
one's length in its ``parameters.binary_data_size``. A gateway that cannot read
this cannot serve a stock client; one that reads it carelessly forwards bodies
whose sizes disagree (a model server reading past a buffer, or treating the
next tensor's bytes as this one's). So every size is checked before anything
is forwarded: the header length against the body, each ``binary_data_size``
against shape x datatype and against what is left, the sum against the body,
each ``BYTES`` element's 4-byte length prefix against its tensor's bytes.
A request that passes is forwarded as the very bytes that came in.

Numbers are read with ``np.frombuffer`` (no copy, no per-element Python);
only ``BYTES`` elements are walked one by one, as their length prefixes demand.
``BF16`` (no numpy type) is kept as its raw 16 bits and widened to FP32 by a
shift when a value is needed. Float tensors must be finite and ``BOOL`` bytes
0 or 1, as in JSON, where NaN and Infinity cannot even be written.

Answers: ``decode_answer``/``encode_answer`` turn a binary answer into the
JSON-shaped dict the harden stage works on and back, so a binary answer is
hardened exactly like a JSON one (``harden_answer``). ``request_is_binary``
and ``batch_size`` are cheap reads for request parameters (``request.params``).
"""

from __future__ import annotations

import math
import re
import struct
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np
import orjson

from .errors import BackendError, InvalidRequest
from .pipeline import RouteKind

if TYPE_CHECKING:
    from .pipeline import BackendResponse, Route

HEADER = "Inference-Header-Content-Length"
OCTET_STREAM = "application/octet-stream"
# little-endian numpy dtype of each datatype's wire bytes; BF16 is read as its raw bits
WIRE_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("u1"), "UINT8": np.dtype("u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype("i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_FLOATS = frozenset({"FP16", "FP32", "FP64"})
_DOT_MAX = 8192  # OpenBLAS runs a dot product on one thread up to 10,000 values
_LENGTH = re.compile(r"[0-9]{1,12}")  # a decimal byte count; 12 digits is far past any body limit
_PREFIX = struct.Struct("<I")


class BinaryViolation(InvalidRequest):
    """A binary tensor body that breaks a size or value rule (``reason`` labels the metric)."""

    def __init__(self, message: str, reason: str = "v2_binary") -> None:
        super().__init__(message)
        self.reason = reason


# -- requests --------------------------------------------------------------------


# v2 routes whose JSON body may come without a Content-Type (tritonclient sends none)
ANY_MEDIA = frozenset({RouteKind.V2_INFER, RouteKind.V2_GENERATE, RouteKind.V2_GENERATE_STREAM})
_GENERATE = frozenset({RouteKind.V2_GENERATE, RouteKind.V2_GENERATE_STREAM})


def binary_header(route: Route | None, headers: Mapping[str, str]) -> str | None:
    """The ``Inference-Header-Content-Length`` of a v2 infer request (None: not binary).

    Any other v2 route carrying it is refused: its upstream would read the
    body as binary tensors the gateway never checked.
    """
    value = headers.get(HEADER)
    if value is None or route is None:
        return None
    if route.kind is RouteKind.V2_INFER:
        return value
    if route.kind in ANY_MEDIA:
        raise BinaryViolation(f"{HEADER}: binary tensors are accepted on infer only")
    return None


def form_ok(route: Route | None, content_type: str) -> bool:
    """generate/generate_stream also take the form type ``curl -d`` sends (Triton's own examples do): read as JSON."""
    return (route is not None and route.kind in _GENERATE
            and content_type.partition(";")[0].strip().lower() == "application/x-www-form-urlencoded")


def header_length(value: str, body_size: int) -> int:
    """The JSON header's byte count from ``Inference-Header-Content-Length``; 400 unless 1..body size."""
    text = value.strip()
    if not _LENGTH.fullmatch(text):
        raise BinaryViolation(f"{HEADER} must be a non-negative decimal byte count")
    length = int(text)
    if length == 0 or length > body_size:
        raise BinaryViolation(f"{HEADER} ({length}) must be between 1 and the body's length ({body_size} bytes)")
    return length


def media_type_ok(content_type: str | None) -> bool:
    """Content-Type of a binary request: absent, ``application/octet-stream`` or a JSON type (the header's)."""
    if content_type is None:
        return True
    main = content_type.partition(";")[0].strip().lower()
    return main == OCTET_STREAM or main == "application/json" or (main.startswith("application/") and main.endswith("+json"))


def request_is_binary(headers: Mapping[str, str]) -> bool:
    """Whether a request uses binary tensors (for ``request.params.binary``): one header lookup."""
    return HEADER in headers


def batch_size(document: Any) -> int | None:
    """The batch size of a v2 request (``request.params.batch``): the first dimension of its first input.

    The same in JSON and binary mode (the JSON header carries the shapes); None
    when the request names no shape (the validate stage refuses it later).
    """
    inputs = document.get("inputs") if type(document) is dict else None
    first = inputs[0] if type(inputs) is list and inputs else None
    shape = first.get("shape") if type(first) is dict else None
    if type(shape) is list and shape and type(shape[0]) is int:
        return int(shape[0])
    return None


class BinaryInputs:
    """The bytes after a request's JSON header, handed out tensor by tensor in input order."""

    __slots__ = ("_tail", "_offset")

    def __init__(self, tail: bytes | memoryview) -> None:
        self._tail = memoryview(tail)
        self._offset = 0

    def take(self, where: str, name: str, datatype: str, shape: list[int], size: Any) -> np.ndarray:
        """The input's values (flat) from its ``binary_data_size`` bytes; 400 naming it on any mismatch.

        Numbers come back as a read-only array over the body (BF16: raw uint16
        bits); BYTES as an object array of ``bytes``.
        """
        if type(size) is not int or size < 0:
            raise BinaryViolation(f"{_label(where, name)}: must be a non-negative integer")
        left = len(self._tail) - self._offset
        if size > left:
            raise BinaryViolation(f"{_label(where, name)}: {size} bytes, but only {left} bytes of binary data "
                                  "are left in the body")
        count = math.prod(shape)
        start = self._offset
        chunk = self._tail[start:start + size]
        if datatype == "BYTES":
            values = _walk_bytes(chunk, count, where, name)
        else:
            wire = WIRE_DTYPES[datatype]
            need = count * wire.itemsize
            if size != need:
                raise BinaryViolation(f"{_label(where, name)}: {size} bytes, but shape {shape} of {datatype} "
                                      f"needs {need}")
            values = np.frombuffer(chunk, dtype=wire)
            _check_values(values, datatype, where, name)
        self._offset = start + size
        return values

    def finish(self) -> None:
        """Every byte of the body belongs to some input: 400 otherwise (nothing may ride along unchecked)."""
        extra = len(self._tail) - self._offset
        if extra:
            raise BinaryViolation(f"/inputs: {extra} bytes of binary data follow the last binary input "
                                  "(the binary_data_size values do not add up to the body)")


def _walk_bytes(chunk: memoryview, count: int, where: str, name: str) -> np.ndarray:
    size = len(chunk)
    if count * 4 > size:
        raise BinaryViolation(f"{_label(where, name)}: {size} bytes cannot hold {count} BYTES elements "
                              "(4-byte length each)")
    out = np.empty(count, dtype=object)
    pos = 0
    unpack = _PREFIX.unpack_from
    for i in range(count):
        if pos + 4 > size:
            raise BinaryViolation(f"{_label(where, name)}: element {i}'s length prefix runs past the input's "
                                  "bytes")
        (length,) = unpack(chunk, pos)
        pos += 4
        if length > size - pos:
            raise BinaryViolation(f"{_label(where, name)}: element {i} ({length} bytes) runs past the "
                                  "input's bytes")
        out[i] = bytes(chunk[pos:pos + length])
        pos += length
    if pos != size:
        raise BinaryViolation(f"{_label(where, name)}: {size - pos} bytes left after the last of its {count} "
                              "elements")
    return out


def _label(where: str, name: str) -> str:
    """Names an input's size in an error (built only when there is one: ``take`` runs on every request)."""
    return f"{where}/parameters/binary_data_size (input {_show(name)})"


def _bad_element(where: str, name: str, index: int, problem: str, reason: str) -> BinaryViolation:
    return BinaryViolation(f"{where} (input {_show(name)}): element {index} {problem}", reason)


def _check_values(values: np.ndarray, datatype: str, where: str, name: str) -> None:
    if not values.size:
        return
    if datatype in _FLOATS:
        # fast path for the small FP32 tensors of most requests, where numpy's fixed costs dominate: a sum of
        # squares is finite only when every value is (NaN and infinity carry through), one BLAS call instead of
        # isfinite + all. Taken in float64, where no sum of FP32 squares can overflow: an overflow would make
        # numpy warn on a client's input (an exception under -W error) and the answer depend on that. Not FP64
        # (its squares can overflow even in float64), not FP16 (no BLAS for it), not past _DOT_MAX values
        # (where BLAS would start threads of its own): those are looked at exactly.
        if datatype == "FP32" and values.size <= _DOT_MAX:
            wide = values.astype(np.float64)
            if math.isfinite(wide.dot(wide)):
                return
        finite = np.isfinite(values)
        if not finite.all():
            raise _bad_element(where, name, int(np.flatnonzero(~finite)[0]), "is NaN or infinite", "v2_range")
    elif datatype == "BF16":
        special = (values & 0x7F80) == 0x7F80  # exponent all ones: infinity or NaN
        if special.any():
            raise _bad_element(where, name, int(np.flatnonzero(special)[0]), "is NaN or infinite", "v2_range")
    elif datatype == "BOOL" and int(values.max()) > 1:
        raise _bad_element(where, name, int(np.flatnonzero(values > 1)[0]), "is not a BOOL (0 or 1)", "v2_datatype")


def as_numbers(values: np.ndarray, datatype: str) -> np.ndarray:
    """Decoded values as numpy numbers: BF16 bits widened to float32, BOOL bytes as bool."""
    if datatype == "BF16":
        return (values.astype("<u4") << 16).view("<f4")
    if datatype == "BOOL":
        return values.view(np.bool_)
    return values


# -- answers ---------------------------------------------------------------------


def wants_binary(request: Any, output: str) -> bool:
    """Whether the request asked for output ``output`` as binary: its own ``binary_data``, else
    ``parameters.binary_data_output`` (tritonclient's defaults either way)."""
    if type(request) is not dict:
        return False
    for item in request.get("outputs") or ():
        if type(item) is dict and item.get("name") == output:
            params = item.get("parameters")
            if type(params) is dict and "binary_data" in params:
                return params["binary_data"] is True
    params = request.get("parameters")
    return type(params) is dict and params.get("binary_data_output") is True


def encode_tensor(datatype: str, data: Any) -> bytes:
    """A tensor's wire bytes (flat, row-major) for ``datatype``."""
    if datatype == "BYTES":
        parts: list[bytes] = []
        for item in np.asarray(data, dtype=object).reshape(-1).tolist():
            raw = item if isinstance(item, bytes) else str(item).encode()
            parts.append(_PREFIX.pack(len(raw)))
            parts.append(raw)
        return b"".join(parts)
    if datatype == "BF16":
        bits = np.asarray(data, dtype="<f4").reshape(-1).view("<u4")
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest even
        return rounded.astype("<u2").tobytes()
    return np.asarray(data, dtype=WIRE_DTYPES[datatype]).reshape(-1).tobytes()


def encode_answer(document: dict[str, Any], binary: Callable[[dict[str, Any]], bool]) -> tuple[bytes, int]:
    """(body, JSON header length) of an answer whose outputs for which ``binary(output)`` holds go as raw bytes."""
    buffers: list[bytes] = []
    outputs = []
    for out in document.get("outputs") or ():
        if binary(out):
            raw = encode_tensor(out["datatype"], out["data"])
            params = {**(out.get("parameters") or {}), "binary_data_size": len(raw)}
            outputs.append({k: v for k, v in out.items() if k != "data"} | {"parameters": params})
            buffers.append(raw)
        else:
            outputs.append(out)
    header = orjson.dumps({**document, "outputs": outputs}, option=orjson.OPT_SERIALIZE_NUMPY)
    return header + b"".join(buffers), len(header)


def decode_answer(body: bytes, length: int) -> tuple[dict[str, Any], set[str]]:
    """(the answer with every binary output's values as a flat array in ``data``, the names of its JSON outputs).

    BF16 outputs come back as float32, BYTES as an object array of ``bytes``.
    A malformed binary answer is the model server's fault: ``BackendError``.
    """
    if not 0 < length <= len(body):
        raise BackendError(f"the model's binary answer is malformed ({HEADER} {length}, body {len(body)} bytes)")
    try:
        header = orjson.loads(body[:length])
    except orjson.JSONDecodeError:
        raise BackendError("the model's binary answer is malformed (header not JSON)") from None
    outputs = header.get("outputs") if type(header) is dict else None
    if type(outputs) is not list:
        raise BackendError("the model's binary answer is malformed (no outputs)")
    reader = BinaryInputs(memoryview(body)[length:])
    decoded: list[Any] = []
    json_names: set[str] = set()
    for i, out in enumerate(outputs):
        params = out.get("parameters") if type(out) is dict else None
        if type(params) is not dict or "binary_data_size" not in params:
            decoded.append(out)
            if type(out) is dict:
                json_names.add(str(out.get("name")))
            continue
        datatype, shape = out.get("datatype"), out.get("shape")
        if datatype not in WIRE_DTYPES and datatype != "BYTES" or type(shape) is not list \
                or not all(type(d) is int and d >= 0 for d in shape):
            raise BackendError("the model's binary answer is malformed (bad output datatype or shape)")
        try:
            values = reader.take(f"/outputs/{i}", str(out.get("name")), datatype, shape, params["binary_data_size"])
        except InvalidRequest as exc:
            raise BackendError(f"the model's binary answer is malformed ({exc.message})") from None
        rest = {k: v for k, v in params.items() if k != "binary_data_size"}
        entry = {k: v for k, v in out.items() if k not in ("parameters", "data")}
        if rest:
            entry["parameters"] = rest
        entry["data"] = as_numbers(values, datatype) if datatype != "BYTES" else values
        decoded.append(entry)
    return {**header, "outputs": decoded}, json_names


def answer_length(response: BackendResponse) -> int | None:
    """The JSON header length of a binary answer (its ``Inference-Header-Content-Length``), None for JSON."""
    for name, value in response.headers:
        if name.lower() == "inference-header-content-length":
            text = value.strip()
            if not _LENGTH.fullmatch(text):
                raise BackendError(f"the model's binary answer is malformed ({HEADER} {text[:20]!r})")
            return int(text)
    return None


Rewrite = Callable[[dict[str, Any]], "tuple[dict[str, Any], dict[str, Any]]"]


def harden_answer(response: BackendResponse, length: int, rewrite: Rewrite) -> None:
    """Harden a binary answer in place: decode, ``rewrite`` (the harden stage's), re-encode binary.

    Outputs that were JSON in the answer stay JSON; every other output, the
    hardened ones included, goes back as raw bytes with the new header length.
    """
    payload, json_names = decode_answer(response.body or b"", length)
    plain, wire = rewrite(payload)
    response.json = plain
    response.body, header = encode_answer(wire, lambda out: out.get("name") not in json_names)
    response.content_type = OCTET_STREAM
    response.headers = [(k, v) for k, v in response.headers if k.lower() not in _REWRITTEN]
    response.headers.append((HEADER, str(header)))


_REWRITTEN = frozenset({"content-length", "content-encoding", "etag", "content-type",
                        "inference-header-content-length"})


def _show(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
