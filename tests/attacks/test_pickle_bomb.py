"""A pickle whose ``__reduce__`` runs a shell command must be refused without ever being unpickled.

Each test first proves the bomb is live (unpickling it in a child process
really creates the marker file), then hands it to the runner in every disguise
an attacker might try, and checks that the refusal explains why and that the
marker never appears.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from backends.torch import TorchBackend, TorchBackendConfig, artifact, loader
from gateway.backend import BackendEnv
from gateway.config import ModelConfig, ServerConfig
from gateway.errors import ConfigError
from gateway.metrics import Metrics
from gateway.typedyaml import Source, build


class Bomb:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def make_backend(tmp_path: Path, **backend: Any) -> TorchBackend:
    source = Source(file=str(tmp_path / "config.yaml"), base_dir=tmp_path)
    model = build(ModelConfig, {"backend": {"type": "torch", "arch": "digits-mlp", **backend}}, "models.digits", source)
    return TorchBackend("digits", model, model.backend.build(TorchBackendConfig), BackendEnv(ServerConfig(), Metrics()))


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "pwned"


@pytest.fixture(autouse=True)
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any call to an unpickler during loading fails the test outright."""
    def forbidden(*_: Any, **__: Any) -> None:
        raise AssertionError("the loader called an unpickler")

    import torch

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)


def prove_live(payload_file: Path, marker: Path) -> None:
    code = "import pickle, sys; pickle.loads(open(sys.argv[1], 'rb').read())"
    subprocess.run([sys.executable, "-c", code, str(payload_file)], check=False, capture_output=True, timeout=60)
    assert marker.exists(), "the bomb should work when unpickled"
    marker.unlink()


async def refused(tmp_path: Path, **backend: Any) -> str:
    with pytest.raises(ConfigError) as info:
        await make_backend(tmp_path, **backend).start()
    return str(info.value)


async def test_plain_pickle_is_refused_and_never_runs(tmp_path: Path, marker: Path) -> None:
    bomb = tmp_path / "model.pt"
    bomb.write_bytes(pickle.dumps(Bomb(marker), protocol=4))
    prove_live(bomb, marker)
    message = await refused(tmp_path, path="model.pt")
    assert "pickle files can execute code when loaded; convert to safetensors" in message
    assert not marker.exists()


async def test_pickle_named_like_safetensors_is_refused(tmp_path: Path, marker: Path) -> None:
    """The format is told by content: a .safetensors name does not get a pickle through."""
    bomb = tmp_path / "digits.safetensors"
    bomb.write_bytes(pickle.dumps(Bomb(marker), protocol=2))
    prove_live(bomb, marker)
    assert "pickle files can execute code" in await refused(tmp_path, path="digits.safetensors")
    assert not marker.exists()


async def test_torch_save_checkpoint_with_bomb_is_refused(tmp_path: Path, marker: Path) -> None:
    """torch.save writes a zip holding data.pkl: it is a pickle too, and not TorchScript."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:  # the layout torch.save produces
        zf.writestr("archive/data.pkl", pickle.dumps(Bomb(marker), protocol=2))
        zf.writestr("archive/version", "3\n")
    (tmp_path / "ckpt.pt").write_bytes(buffer.getvalue())
    (tmp_path / "inner.pkl").write_bytes(pickle.dumps(Bomb(marker), protocol=2))
    prove_live(tmp_path / "inner.pkl", marker)
    message = await refused(tmp_path, path="ckpt.pt")
    assert "torch.save checkpoint" in message and "can execute code" in message
    assert not marker.exists()


async def test_encrypted_pickle_is_refused_after_decryption(tmp_path: Path, marker: Path) -> None:
    """Encryption proves who wrote a file, not that it is safe: the format check still applies."""
    key = artifact.new_key()
    (tmp_path / "k").write_text(artifact.encode_key(key))
    with open(tmp_path / "m.enc", "wb") as dst:
        artifact.encrypt_stream(io.BytesIO(pickle.dumps(Bomb(marker))), dst, key, chunk_size=1024)
    assert "pickle files can execute code" in await refused(tmp_path, path="m.enc", key_file="k")
    assert not marker.exists()


def test_sniffing_recognises_every_pickle_protocol(marker: Path) -> None:
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        assert loader.sniff(pickle.dumps(Bomb(marker), protocol=protocol)) == "pickle"
    assert loader.sniff(pickle.dumps({"a": 1}, protocol=0)) == "unknown"  # refused all the same
    assert not marker.exists()
