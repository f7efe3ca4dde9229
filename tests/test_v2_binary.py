"""The binary tensor codec (``gateway.v2_binary``) against tritonclient's own serialisation.

A property test: for random shapes and datatypes, what ``tritonclient.http``
puts on the wire decodes, in the gateway, to the very array it was made from;
and what the gateway encodes, tritonclient reads back unchanged. Then the
size rules, one by one.
"""

from __future__ import annotations

import struct
import warnings
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

tritonclient_http = pytest.importorskip("tritonclient.http")
import ml_dtypes  # noqa: E402  (installed with tritonclient: its BF16 type)

from gateway.errors import BackendError, InvalidRequest  # noqa: E402
from gateway.v2 import check_infer_request  # noqa: E402
from gateway.v2_binary import (  # noqa: E402
    BinaryInputs, batch_size, decode_answer, encode_answer, header_length, wants_binary,
)

NUMERIC = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
           "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
           "FP32": np.float32, "FP64": np.float64, "BF16": ml_dtypes.bfloat16}
shapes = st.lists(st.integers(0, 4), min_size=1, max_size=3)


def _array(draw: Any, datatype: str, shape: list[int]) -> np.ndarray:
    count = int(np.prod(shape))
    if datatype == "BYTES":
        items = draw(st.lists(st.binary(max_size=12), min_size=count, max_size=count))
        return np.array(items + [b""] * 0, dtype=object).reshape(shape)
    if datatype == "BOOL":
        return np.array(draw(st.lists(st.booleans(), min_size=count, max_size=count)), dtype=bool).reshape(shape)
    dtype = NUMERIC[datatype]
    if datatype in ("FP16", "BF16", "FP32", "FP64"):
        width = {"FP16": 16, "BF16": 32, "FP32": 32, "FP64": 64}[datatype]
        values = draw(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=width,
                                         min_value=-60000, max_value=60000), min_size=count, max_size=count))
        return np.array(values, dtype=np.float64).astype(dtype).reshape(shape)
    info = np.iinfo(dtype)
    values = draw(st.lists(st.integers(int(info.min), int(info.max)), min_size=count, max_size=count))
    return np.array(values, dtype=dtype).reshape(shape)


@st.composite
def tensors(draw: Any) -> tuple[str, np.ndarray]:
    datatype = draw(st.sampled_from([*NUMERIC, "BYTES"]))
    return datatype, _array(draw, datatype, draw(shapes))


def _same(datatype: str, got: Any, want: np.ndarray) -> None:
    if datatype == "BYTES":
        assert [bytes(x) for x in np.asarray(got).reshape(-1)] == [bytes(x) for x in want.reshape(-1)]
    elif datatype == "BF16":
        assert np.array_equal(np.asarray(got, np.float32).reshape(-1), want.astype(np.float32).reshape(-1))
    else:
        assert np.array_equal(np.asarray(got).reshape(-1), want.reshape(-1))


@settings(max_examples=150, deadline=None)
@given(st.lists(tensors(), min_size=1, max_size=4))
def test_decoding_agrees_with_tritonclient_serialisation(cases: list[tuple[str, np.ndarray]]) -> None:
    inputs = []
    for i, (datatype, array) in enumerate(cases):
        tensor = tritonclient_http.InferInput(f"in{i}", list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=True)
        inputs.append(tensor)
    body, json_size = tritonclient_http.InferenceServerClient.generate_request_body(inputs)
    import json

    length = json_size if json_size is not None else len(body)
    header = json.loads(body[:length])
    arrays: dict[str, np.ndarray] = {}
    check_infer_request(header, None, arrays, BinaryInputs(memoryview(body)[length:]))
    for i, (datatype, array) in enumerate(cases):
        _same(datatype, arrays[f"in{i}"], array)  # handed on as numbers (BF16 widened to FP32)


@settings(max_examples=100, deadline=None)
@given(st.lists(tensors(), min_size=1, max_size=4))
def test_tritonclient_reads_what_the_gateway_encodes(cases: list[tuple[str, np.ndarray]]) -> None:
    outputs = [{"name": f"out{i}", "datatype": dt, "shape": list(a.shape),
                "data": a.astype(np.float32) if dt == "BF16" else a} for i, (dt, a) in enumerate(cases)]
    body, length = encode_answer({"model_name": "m", "outputs": outputs}, lambda _out: True)
    result = tritonclient_http.InferResult.from_response_body(body, header_length=length)
    decoded, json_names = decode_answer(body, length)
    assert json_names == set()
    for i, (datatype, array) in enumerate(cases):
        _same(datatype, result.as_numpy(f"out{i}"), array)
        _same(datatype, decoded["outputs"][i]["data"], array)


@pytest.mark.parametrize("value", ["-1", "abc", "1e3", "0", "99999999999999999999", " ", "201", "0x10"])
def test_header_length_must_be_within_the_body(value: str) -> None:
    with pytest.raises(InvalidRequest, match="Inference-Header-Content-Length"):
        header_length(value, 200)
    assert header_length("200", 200) == 200 and header_length(" 17 ", 200) == 17


def _take(raw: bytes, datatype: str, shape: list[int], size: int) -> Any:
    return BinaryInputs(raw).take("/inputs/0", "x", datatype, shape, size)


def test_size_rules_name_the_input() -> None:
    four = np.arange(4, dtype="<f4").tobytes()
    with pytest.raises(InvalidRequest, match=r"input 'x'.*12 bytes, but shape \[4\] of FP32 needs 16"):
        _take(four, "FP32", [4], 12)
    with pytest.raises(InvalidRequest, match="only 16 bytes of binary data are left"):
        _take(four, "FP32", [5], 20)
    with pytest.raises(InvalidRequest, match="non-negative integer"):
        _take(four, "FP32", [4], -16)
    reader = BinaryInputs(four + b"xx")
    reader.take("/inputs/0", "x", "FP32", [4], 16)
    with pytest.raises(InvalidRequest, match="2 bytes of binary data follow the last binary input"):
        reader.finish()


def test_bytes_elements_are_walked_by_their_length_prefixes() -> None:
    good = struct.pack("<I", 2) + b"hi" + struct.pack("<I", 0)
    assert [bytes(v) for v in _take(good, "BYTES", [2], len(good))] == [b"hi", b""]
    past = struct.pack("<I", 50) + b"hi"
    with pytest.raises(InvalidRequest, match="element 0 .50 bytes. runs past"):
        _take(past, "BYTES", [1], len(past))
    with pytest.raises(InvalidRequest, match="cannot hold 3 BYTES elements"):
        _take(good, "BYTES", [3], len(good))
    with pytest.raises(InvalidRequest, match="bytes left after the last of its 1 elements"):
        _take(good, "BYTES", [1], len(good))
    with pytest.raises(InvalidRequest, match="cannot hold"):  # a huge shape is refused before any allocation
        _take(good, "BYTES", [10**12], len(good))


def test_values_are_checked_like_json() -> None:
    with pytest.raises(InvalidRequest, match="element 1 is NaN or infinite"):
        _take(np.array([1, np.nan], "<f4").tobytes(), "FP32", [2], 8)
    with pytest.raises(InvalidRequest, match="element 0 is NaN or infinite"):
        _take(np.array([np.inf], np.float32).astype(ml_dtypes.bfloat16).tobytes(), "BF16", [1], 2)
    with pytest.raises(InvalidRequest, match="element 1 is not a BOOL"):
        _take(b"\x01\x02", "BOOL", [2], 2)


@pytest.mark.parametrize("datatype,numpy_type", [("FP16", "<f2"), ("FP32", "<f4"), ("FP64", "<f8")])
@pytest.mark.parametrize("size", [1, 784, 8193])  # 8193: past the one-BLAS-call shortcut
def test_finite_floats_pass_and_any_nan_or_infinity_is_named_at_every_size(datatype, numpy_type, size) -> None:
    """The shortcut (one sum of squares) and the exact check agree: huge finite values, whose squares overflow
    in their own type, still pass; a NaN or an infinity anywhere is refused with its index. Warnings are errors
    here: a client's values must not make numpy warn (a stray line on the gateway's stderr, and an exception
    where warnings are errors, which would turn a valid request into a 500)."""
    largest = float(np.finfo(numpy_type).max)
    values = (np.linspace(-1.0, 1.0, size) * largest).astype(numpy_type)  # squares overflow to infinity
    assert np.isfinite(values).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(_take(values.tobytes(), datatype, [size], values.nbytes)) == size
        for bad in (np.nan, np.inf, -np.inf):
            broken = values.copy()
            broken[size // 2] = bad
            with pytest.raises(InvalidRequest, match=f"element {size // 2} is NaN or infinite"):
                _take(broken.tobytes(), datatype, [size], broken.nbytes)


def test_binary_data_needs_the_header_and_excludes_json_data() -> None:
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}}]}
    with pytest.raises(InvalidRequest, match="needs the Inference-Header-Content-Length"):
        check_infer_request(doc)
    doc["inputs"][0]["data"] = [1.0]
    with pytest.raises(InvalidRequest, match="both data and parameters.binary_data_size"):
        check_infer_request(doc, None, None, BinaryInputs(b"\0\0\0\0"))
    bf16 = {"inputs": [{"name": "x", "datatype": "BF16", "shape": [1], "data": [1.0]}]}
    with pytest.raises(InvalidRequest, match="BF16 is sent only as binary data"):
        check_infer_request(bf16)


@pytest.mark.parametrize("where", ["input", "output"])
def test_shared_memory_is_refused(where: str) -> None:
    doc: dict[str, Any] = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}
    params = {"shared_memory_region": "r0", "shared_memory_byte_size": 4}
    if where == "input":
        doc["inputs"][0]["parameters"] = params
    else:
        doc["outputs"] = [{"name": "y", "parameters": params}]
    with pytest.raises(InvalidRequest, match="shared_memory_region: shared memory is not accepted"):
        check_infer_request(doc)


def test_binary_output_wishes_and_batch() -> None:
    assert wants_binary({"parameters": {"binary_data_output": True}}, "y")
    assert not wants_binary({"outputs": [{"name": "y", "parameters": {"binary_data": False}}],
                             "parameters": {"binary_data_output": True}}, "y")
    assert wants_binary({"outputs": [{"name": "y", "parameters": {"binary_data": True}}]}, "y")
    assert not wants_binary({"inputs": []}, "y")
    assert batch_size({"inputs": [{"shape": [7, 64]}]}) == 7 and batch_size({"inputs": []}) is None


def test_a_malformed_binary_answer_is_a_backend_error() -> None:
    header = b'{"outputs":[{"name":"y","datatype":"FP32","shape":[4],"parameters":{"binary_data_size":16}}]}'
    with pytest.raises(BackendError, match="malformed"):
        decode_answer(header + b"\0" * 8, len(header))
    with pytest.raises(BackendError, match="malformed"):
        decode_answer(header, len(header) + 1)
