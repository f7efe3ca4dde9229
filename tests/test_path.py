"""Path normalisation: confusable spellings become one path; ambiguous ones are refused."""

from __future__ import annotations

import pytest

from gateway.errors import InvalidRequest
from gateway.stages.path import normalise, split_target


@pytest.mark.parametrize("raw, expected", [
    ("/v2/models/digits/infer", "/v2/models/digits/infer"),
    ("/v2//models///digits/infer", "/v2/models/digits/infer"),
    ("/v2/models/other/../digits/infer", "/v2/models/digits/infer"),
    ("/v2/models/./digits/./infer", "/v2/models/digits/infer"),
    ("/v2/models/%64igits/infer", "/v2/models/digits/infer"),
    ("/v2/models/%2e%2e/models/digits/infer", "/v2/models/digits/infer"),
    ("/v2/%6Dodels/digits/infer", "/v2/models/digits/infer"),
    ("/../../v2/models/digits/infer", "/v2/models/digits/infer"),
    ("/a/%7e%2A", "/a/~%2A"),
])
def test_normalises(raw: str, expected: str) -> None:
    assert normalise(raw) == expected


@pytest.mark.parametrize("raw, reason", [
    ("/v2/models/dig%2Fits/infer", "encoded slash"),
    ("/v2/models/dig%2fits/infer", "encoded slash"),
    ("/v2/models/digits\\infer", "backslash"),
    ("/v2/models/digits%5Cinfer", "backslash"),
    ("/v2/models/digits%00/infer", "control character"),
    ("/v2/models/digits%0a/infer", "control character"),
    ("/v2/models/digits\x07/infer", "control character"),
    ("/v2/models/%zz/infer", "malformed percent-encoding"),
    ("/v2/models/%4/infer", "malformed percent-encoding"),
    ("/v2/models/dïgits/infer", "invalid character"),
])
def test_refuses(raw: str, reason: str) -> None:
    with pytest.raises(InvalidRequest, match=reason):
        normalise(raw)


def test_absolute_form_keeps_only_the_path() -> None:
    assert split_target("http://evil.example/v2/models/digits/infer?x=1") == ("/v2/models/digits/infer", "x=1")


def test_target_must_be_a_path() -> None:
    with pytest.raises(InvalidRequest):
        split_target("*")
