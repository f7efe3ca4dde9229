"""The hardened JSON parser: every refusal with its reason, and exact agreement on what it accepts."""

from __future__ import annotations

import json
import random

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import jsonsafe
from gateway.errors import InvalidRequest


def refused(body: bytes, **limits: int) -> jsonsafe.MalformedJson:
    with pytest.raises(jsonsafe.MalformedJson) as info:
        jsonsafe.parse(body, **limits)
    assert isinstance(info.value, InvalidRequest) and info.value.status == 400
    return info.value


@pytest.mark.parametrize("body", [
    b'{"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1.5, -2, 3e-5]}]}',
    b'{"model": "chat", "messages": [{"role": "user", "content": "hi \\"there\\" [{,:}]"}]}',
    b'[]', b'{}', b'0', b'"text"', b'null', b' \n{"a": 1}\n ',
    b'{"a\\"": "\\\\", "b:": "\\n,", "c": ["{", "}"]}',
    b'[1, {"a": 1, "b": 2}, [{"a": 1}, {"a": 2}]]',  # same key in *different* objects is fine
    b'{"a": "\\ud83d\\ude00"}',  # a surrogate *pair* is a valid escape
    b'{"big": 18446744073709551615, "tiny": 1e-999}',
])
def test_accepts_valid_json_exactly_as_the_standard_library_reads_it(body: bytes) -> None:
    assert jsonsafe.parse(body) == json.loads(body)


def test_accepts_a_typical_tensor() -> None:
    doc = {"inputs": [{"name": "x", "shape": [1, 784], "datatype": "FP32",
                       "data": [random.random() for _ in range(784)]}]}
    assert jsonsafe.parse(orjson.dumps(doc)) == doc


@pytest.mark.parametrize("body", [b"", b"   ", b"\n\t"])
def test_empty_body(body: bytes) -> None:
    assert refused(body).reason == "empty"


def test_deep_nesting_is_refused_before_parsing() -> None:
    err = refused(b"[" * 10_000 + b"]" * 10_000)
    assert err.reason == "too_deep" and "64" in err.message


def test_deep_objects_and_unbalanced_nesting() -> None:
    assert refused(b'{"a":' * 10_000 + b"1" + b"}" * 10_000).reason == "too_deep"
    assert refused(b"[" * 100_000).reason == "too_deep"  # never closed: still no recursion, still a 400


def test_depth_limit_is_exact() -> None:
    assert jsonsafe.parse(b"[" * 64 + b"]" * 64, max_depth=64) is not None
    assert refused(b"[" * 65 + b"]" * 65, max_depth=64).reason == "too_deep"
    assert jsonsafe.parse(b"[" * 65 + b"]" * 65, max_depth=65) is not None


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    body = b'{"a": "' + b"[{" * 5_000 + b'", "b": "\\"[[[["}'
    assert jsonsafe.parse(body)["b"] == '"[[[['


def test_many_shallow_containers_are_not_mistaken_for_depth() -> None:
    body = b"[" + b",".join([b"[[1],[2]]"] * 1000) + b"]"
    assert len(jsonsafe.parse(body)) == 1000


def test_a_million_element_array_is_refused() -> None:
    err = refused(b"[" + b",".join([b"0"] * 1_000_001) + b"]")
    assert err.reason == "too_many_elements"


def test_element_limit_counts_object_members_too() -> None:
    members = b",".join(b'"k%d":0' % i for i in range(11))
    assert refused(b"{" + members + b"}", max_elements=10).reason == "too_many_elements"
    assert len(jsonsafe.parse(b"{" + members + b"}", max_elements=11)) == 11


@pytest.mark.parametrize("body", [
    b'{"a": NaN}', b'{"a": Infinity}', b'{"a": -Infinity}', b'[1, NaN]', b'[Infinity]',
])
def test_nan_and_infinity_literals(body: bytes) -> None:
    err = refused(body)
    assert err.reason == "non_finite" and "NaN and Infinity" in err.message


@pytest.mark.parametrize("body", [b"[1e999]", b"[-1e400]", b"[1" + b"0" * 400 + b".0]"])
def test_numbers_that_overflow_to_infinity(body: bytes) -> None:
    assert refused(body).reason == "non_finite"


def test_nan_inside_a_string_is_just_text() -> None:
    assert jsonsafe.parse(b'{"NaN": "Infinity"}') == {"NaN": "Infinity"}


@pytest.mark.parametrize("body, key", [
    (b'{"a": 1, "a": 2}', "a"),
    (b'{"inputs": [{"name": "x", "name": "y"}]}', "name"),
    (b'{"a": {"b": [1, 2, {"c": 1, "d": 2, "c": 3}]}}', "c"),  # hidden behind a scalar-led list
    (b'[0.5, 1.5, {"model": "cheap", "model": "expensive"}]', "model"),
    (b'{"a": 1, "\\u0061": 2}', "a"),  # the same key spelled with an escape
])
def test_duplicate_keys_at_any_depth(body: bytes, key: str) -> None:
    err = refused(body)
    assert err.reason == "duplicate_key" and repr(key) in err.message


def test_duplicate_key_message_is_cut_short() -> None:
    long_key = "k" * 5000
    err = refused(b'{"%s": 1, "%s": 2}' % (long_key.encode(), long_key.encode()))
    assert len(err.message) < 120


@pytest.mark.parametrize("body", [
    b'{"a": "\xff"}',  # not UTF-8
    b'{"a": "\xc3"}',  # truncated sequence
    b'{"a": "\xed\xa0\x80"}',  # an encoded surrogate
    b'{"a": "\xc0\xaf"}',  # overlong encoding of "/"
    b"\xef\xbb\xbf{}",  # byte-order mark
])
def test_invalid_utf8(body: bytes) -> None:
    assert refused(body).reason == "encoding"


@pytest.mark.parametrize("body", [b'{"a": "\\ud800"}', b'{"a": "\\udc00x"}', b'["\\ud83d"]'])
def test_lone_surrogate_escapes(body: bytes) -> None:
    assert refused(body).reason == "encoding"


@pytest.mark.parametrize("body", [b'{"a": 1}x', b'{"a": 1}{"a": 2}', b"[1] [2]", b'{"a":1}\x00'])
def test_trailing_garbage(body: bytes) -> None:
    assert refused(body).reason == "trailing_data"


@pytest.mark.parametrize("body", [b"{", b'{"a" 1}', b"[1,]", b"{'a': 1}", b'{"a": 01}', b'"\x01"', b"tru"])
def test_syntax_errors(body: bytes) -> None:
    err = refused(body)
    assert err.reason == "syntax" and err.message.startswith("malformed JSON")


def test_error_message_does_not_echo_the_body() -> None:
    secret = b"sk-" + b"s" * 200
    err = refused(b'{"key": "' + secret + b'", }')
    assert secret.decode() not in err.message


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=6),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None, database=None)
@given(JSON_VALUES, st.booleans())
def test_any_json_value_reads_back_exactly(value: object, compact: bool) -> None:
    body = json.dumps(value, separators=(",", ":") if compact else None, ensure_ascii=compact).encode()
    assert jsonsafe.parse(body) == json.loads(body)


@settings(max_examples=400, deadline=None, database=None)
@given(st.binary(max_size=64) | JSON_VALUES.map(lambda v: json.dumps(v).encode()).map(lambda b: b[: len(b) // 2]))
def test_arbitrary_bytes_are_json_or_a_400(body: bytes) -> None:
    try:
        document = jsonsafe.parse(body)
    except jsonsafe.MalformedJson:
        return
    assert document == json.loads(body)  # accepted => exactly what a strict parser reads
