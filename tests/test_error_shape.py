"""The error document's two shapes, decided in one place (``gateway.errors.error_body``).

Flat on the Open Inference Protocol and Ollama paths, whose clients read ``error``
as a string (``tritonclient`` raises ``TypeError`` printing an object there);
nested everywhere else.
"""

from __future__ import annotations

import orjson
import pytest

from gateway.errors import error_body, flat_errors


@pytest.mark.parametrize("path", ["/v2", "/v2/", "/v2/models/m/infer", "/v2/health/ready", "/api", "/api/chat",
                                  "/v2/models/a%2Fb/infer"])
def test_flat_on_v2_and_api(path: str) -> None:
    assert flat_errors(path)
    assert orjson.loads(error_body("not_found", "unknown model", "r-1", path)) == {
        "error": "unknown model", "type": "not_found", "request_id": "r-1"}


@pytest.mark.parametrize("path", ["", "/", "/v1/chat/completions", "/v2x", "/apis/x", "/predict", "/v1/models"])
def test_nested_elsewhere(path: str) -> None:
    assert not flat_errors(path)
    assert orjson.loads(error_body("not_found", "unknown model", "r-1", path)) == {
        "error": {"type": "not_found", "message": "unknown model", "request_id": "r-1"}}
