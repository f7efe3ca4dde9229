"""Serving TorchScript without input_shape: the shape the model declares, or -1 dimensions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.test_torch_guard import MLP, archive

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.* in torch >= 2.9


class Declares(nn.Module):
    """A scripted model that declares its sample shape with an attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.input_shape = [64]
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class PerToken(nn.Module):
    """[n, seq] token ids in, [n, seq] scores out: the output shape follows the input's."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x).sum(-1)


async def test_torchscript_without_input_shape_serves_declared_or_any_shape(tmp_path: Path) -> None:
    import orjson

    from gateway.errors import ConfigError
    from gateway.pipeline import RouteKind
    from tests.test_torch_backend import context, infer_body, make_backend

    (tmp_path / "mlp.pt").write_bytes(archive(torch.jit.script(MLP())))
    (tmp_path / "declares.pt").write_bytes(archive(torch.jit.script(Declares())))
    with pytest.raises(ConfigError, match="TorchScript model: a program, not just weights"):
        await make_backend(tmp_path, path="mlp.pt").start()

    declared = make_backend(tmp_path, path="declares.pt", allow_torchscript=True)
    await declared.start()
    try:
        meta = orjson.loads((await declared.handle(context(RouteKind.V2_METADATA))).body or b"")
        assert meta["inputs"][0]["shape"] == [-1, 64] and meta["outputs"][0]["shape"] == [-1, 10]
    finally:
        await declared.close()

    anyshape = make_backend(tmp_path, path="mlp.pt", allow_torchscript=True)
    await anyshape.start()
    try:
        meta = orjson.loads((await anyshape.handle(context(RouteKind.V2_METADATA))).body or b"")
        assert meta["inputs"][0]["shape"] == [-1, -1] and meta["outputs"][0]["shape"] == [-1, -1]
        answer = await anyshape.handle(context(RouteKind.V2_INFER, infer_body([0.5] * 128, n=2)))
        assert answer.json is not None and answer.json["outputs"][0]["shape"] == [2, 10]
    finally:
        await anyshape.close()


async def test_a_batch_of_differing_shapes_runs_request_by_request(tmp_path: Path) -> None:
    import asyncio

    from gateway.pipeline import RouteKind
    from tests.test_torch_backend import context, make_backend

    (tmp_path / "tok.pt").write_bytes(archive(torch.jit.script(PerToken())))
    backend = make_backend(tmp_path, path="tok.pt", allow_torchscript=True, input_datatype="INT64",
                           max_batch_delay_ms=200)
    await backend.start()
    try:
        def body(length: int) -> dict[str, Any]:
            return {"inputs": [{"name": "input", "shape": [1, length], "datatype": "INT64",
                                "data": list(range(length))}]}

        answers = await asyncio.gather(*(backend.handle(context(RouteKind.V2_INFER, body(n))) for n in (3, 5, 3)))
        shapes = [a.json["outputs"][0]["shape"] for a in answers if a.json is not None]
        assert shapes == [[1, 3], [1, 5], [1, 3]]
        assert backend.stats()["max_batch_size_seen"] > 1  # they did share a batch
    finally:
        await backend.close()


async def test_a_traced_model_declares_its_shape_in_an_extra_file(tmp_path: Path) -> None:
    import io
    import warnings

    import orjson

    from gateway.pipeline import RouteKind
    from tests.test_torch_backend import context, make_backend

    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(MLP().eval(), torch.rand(1, 64))
        torch.jit.save(traced, buffer, _extra_files={"input_shape": "[64]"})
    (tmp_path / "traced.pt").write_bytes(buffer.getvalue())
    backend = make_backend(tmp_path, path="traced.pt", allow_torchscript=True)
    await backend.start()
    try:
        meta = orjson.loads((await backend.handle(context(RouteKind.V2_METADATA))).body or b"")
        assert meta["inputs"][0]["shape"] == [-1, 64] and meta["outputs"][0]["shape"] == [-1, 10]
    finally:
        await backend.close()
