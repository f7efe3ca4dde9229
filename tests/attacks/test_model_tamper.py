"""Attacks on the model artifact at rest: each is refused at start-up with its own message.

The artifact is the real bundled digits model, encrypted in 4 KiB chunks (five
chunks), and the refusal is observed where an operator sees it: the
``ConfigError`` that stops the gateway, naming the model.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from backends.torch import TorchBackend, TorchBackendConfig, artifact, signing
from gateway.backend import BackendEnv
from gateway.config import ModelConfig, ServerConfig
from gateway.errors import ConfigError, Unavailable
from gateway.metrics import Metrics
from gateway.pipeline import RequestContext, Route, RouteKind
from gateway.request import BufferedRequest
from gateway.typedyaml import Source, build

BUNDLED = Path(__file__).resolve().parents[2] / "backends" / "torch" / "assets" / "digits.safetensors"
CHUNK = 4096
RECORD = CHUNK + artifact.TAG_BYTES


def make_backend(tmp_path: Path, **backend: Any) -> TorchBackend:
    source = Source(file=str(tmp_path / "config.yaml"), base_dir=tmp_path)
    model = build(ModelConfig, {"backend": {"type": "torch", "arch": "digits-mlp", **backend}}, "models.digits", source)
    return TorchBackend("digits", model, model.backend.build(TorchBackendConfig), BackendEnv(ServerConfig(), Metrics()))


@pytest.fixture
def protected(tmp_path: Path) -> dict[str, Any]:
    """An encrypted, signed copy of the bundled model, its key file and the signer's public key."""
    key = artifact.new_key()
    (tmp_path / "model.key").write_text(artifact.encode_key(key) + "\n")
    enc = tmp_path / "digits.enc"
    with open(BUNDLED, "rb") as src, open(enc, "wb") as dst:
        artifact.encrypt_stream(src, dst, key, chunk_size=CHUNK)
    signer = signing.new_signing_key()
    signing.sign_file(enc, signer)
    (tmp_path / "signer.pub").write_bytes(signing.public_pem(signer.public_key()))
    blob = enc.read_bytes()
    assert (len(blob) - artifact.PREAMBLE_BYTES) // RECORD == 4  # four full chunks and a short final one
    return {"path": enc, "key": key, "signer": signer, "blob": blob,
            "config": {"path": "digits.enc", "key_file": "model.key"}}


async def refusal(tmp_path: Path, **backend: Any) -> str:
    with pytest.raises(ConfigError) as info:
        await make_backend(tmp_path, **backend).start()
    message = str(info.value)
    assert message.startswith("model digits: ")
    assert "\n" not in message
    return message


def record(index: int) -> slice:
    start = artifact.PREAMBLE_BYTES + index * RECORD
    return slice(start, start + RECORD)


async def test_intact_artifact_loads(tmp_path: Path, protected: dict[str, Any]) -> None:
    backend = make_backend(tmp_path, **protected["config"], verify_key_file="signer.pub")
    await backend.start()
    try:
        assert backend.ready() and backend.info["encrypted"] and backend.info["signed"]
    finally:
        await backend.close()


async def test_flipped_byte_in_header(tmp_path: Path, protected: dict[str, Any]) -> None:
    blob = bytearray(protected["blob"])
    blob[30] ^= 0x01  # inside the salt
    protected["path"].write_bytes(blob)
    assert "header corrupted or wrong key" in await refusal(tmp_path, **protected["config"])


async def test_flipped_byte_in_middle_chunk(tmp_path: Path, protected: dict[str, Any]) -> None:
    blob = bytearray(protected["blob"])
    blob[record(2).start + 100] ^= 0x80
    protected["path"].write_bytes(blob)
    message = await refusal(tmp_path, **protected["config"])
    assert "chunk 2 failed authentication (tampered, reordered or wrong key)" in message


async def test_flipped_byte_in_tag(tmp_path: Path, protected: dict[str, Any]) -> None:
    blob = bytearray(protected["blob"])
    blob[record(1).stop - 1] ^= 0x01  # last byte of chunk 1's GCM tag
    protected["path"].write_bytes(blob)
    assert "chunk 1 failed authentication" in await refusal(tmp_path, **protected["config"])


async def test_flipped_byte_in_header_tag(tmp_path: Path, protected: dict[str, Any]) -> None:
    blob = bytearray(protected["blob"])
    blob[artifact.PREAMBLE_BYTES - 1] ^= 0x01
    protected["path"].write_bytes(blob)
    assert "header failed authentication" in await refusal(tmp_path, **protected["config"])


async def test_dropped_last_chunk(tmp_path: Path, protected: dict[str, Any]) -> None:
    protected["path"].write_bytes(protected["blob"][:record(4).start])
    assert "file truncated: final chunk missing" in await refusal(tmp_path, **protected["config"])


async def test_cut_inside_last_chunk(tmp_path: Path, protected: dict[str, Any]) -> None:
    protected["path"].write_bytes(protected["blob"][:-5])
    assert "file truncated: chunk 4 incomplete" in await refusal(tmp_path, **protected["config"])


async def test_swapped_chunks(tmp_path: Path, protected: dict[str, Any]) -> None:
    blob = bytearray(protected["blob"])
    one, three = bytes(blob[record(1)]), bytes(blob[record(3)])
    blob[record(1)], blob[record(3)] = three, one
    protected["path"].write_bytes(blob)
    assert "chunk 1 failed authentication: it is chunk 3 of this file (chunks reordered)" in \
        await refusal(tmp_path, **protected["config"])


async def test_appended_chunk(tmp_path: Path, protected: dict[str, Any]) -> None:
    blob = protected["blob"]
    protected["path"].write_bytes(blob + blob[record(0)])
    assert "data after final chunk" in await refusal(tmp_path, **protected["config"])


async def test_wrong_key(tmp_path: Path, protected: dict[str, Any]) -> None:
    (tmp_path / "model.key").write_text(artifact.encode_key(artifact.new_key()))
    assert "wrong key" in await refusal(tmp_path, **protected["config"])


async def test_wrong_signature(tmp_path: Path, protected: dict[str, Any]) -> None:
    other = signing.new_signing_key()  # the attacker re-signs with a key of their own
    signing.sign_file(protected["path"], other)
    message = await refusal(tmp_path, **protected["config"], verify_key_file="signer.pub")
    assert "signed by another key" in message


async def test_altered_signature_bytes(tmp_path: Path, protected: dict[str, Any]) -> None:
    sig_path = signing.signature_path(protected["path"])
    text = sig_path.read_text()
    sig = signing.parse(text.encode(), where="x")
    forged = bytearray(sig.signature)
    forged[0] ^= 1
    import base64
    sig_path.write_text(text.replace(base64.b64encode(sig.signature).decode(), base64.b64encode(bytes(forged)).decode()))
    assert "bad signature" in await refusal(tmp_path, **protected["config"], verify_key_file="signer.pub")


async def test_signature_of_another_model(tmp_path: Path, protected: dict[str, Any]) -> None:
    other = tmp_path / "other.enc"
    other.write_bytes(protected["blob"][:-1] + b"\x00")  # another artifact, properly signed by the same signer
    signing.sign_file(other, protected["signer"])
    shutil.copy(signing.signature_path(other), signing.signature_path(protected["path"]))
    message = await refusal(tmp_path, **protected["config"], verify_key_file="signer.pub")
    assert "signature is for another model file ('other.enc', not 'digits.enc')" in message


async def test_same_name_other_content_with_its_signature(tmp_path: Path, protected: dict[str, Any]) -> None:
    """A signed model from elsewhere renamed to this model's name: the name is bound, so it fails."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.enc").write_bytes(protected["blob"])
    signing.sign_file(elsewhere / "x.enc", protected["signer"])
    shutil.copy(signing.signature_path(elsewhere / "x.enc"), signing.signature_path(protected["path"]))
    assert "signature is for another model file" in await refusal(tmp_path, **protected["config"],
                                                                  verify_key_file="signer.pub")


async def test_modified_artifact_with_stale_signature(tmp_path: Path, protected: dict[str, Any]) -> None:
    """Re-encrypted with the right key (an insider's change) but not re-signed: the signature catches it."""
    with open(BUNDLED, "rb") as src, open(protected["path"], "wb") as dst:
        artifact.encrypt_stream(src, dst, protected["key"], chunk_size=CHUNK)
    assert "SHA-256 differs" in await refusal(tmp_path, **protected["config"], verify_key_file="signer.pub")


async def test_unsigned_artifact_when_signature_required(tmp_path: Path, protected: dict[str, Any]) -> None:
    signing.signature_path(protected["path"]).unlink()
    assert "artifact is not signed: digits.enc.sig not found" in \
        await refusal(tmp_path, **protected["config"], verify_key_file="signer.pub")


async def test_plaintext_swapped_in_for_encrypted_model(tmp_path: Path, protected: dict[str, Any]) -> None:
    shutil.copy(BUNDLED, protected["path"])  # never falls back to plaintext
    assert "refusing to load it as plaintext" in await refusal(tmp_path, **protected["config"])


async def test_encrypted_model_without_key(tmp_path: Path, protected: dict[str, Any]) -> None:
    assert "no key_env or key_file" in await refusal(tmp_path, path="digits.enc")


async def test_missing_model_file(tmp_path: Path) -> None:
    assert "not found" in await refusal(tmp_path, path="nowhere.safetensors")


async def test_missing_key_env(tmp_path: Path, protected: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAAS_TEST_MODEL_KEY", raising=False)
    message = await refusal(tmp_path, path="digits.enc", key_env="MAAS_TEST_MODEL_KEY")
    assert "environment variable MAAS_TEST_MODEL_KEY is not set" in message


async def test_key_from_env_is_never_in_errors(tmp_path: Path, protected: dict[str, Any],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = artifact.encode_key(artifact.new_key())
    monkeypatch.setenv("MAAS_TEST_MODEL_KEY", wrong)
    message = await refusal(tmp_path, path="digits.enc", key_env="MAAS_TEST_MODEL_KEY")
    assert "wrong key" in message and wrong not in message


async def test_degraded_start_serves_503_and_not_ready(tmp_path: Path, protected: dict[str, Any]) -> None:
    blob = bytearray(protected["blob"])
    blob[record(2).start] ^= 1
    protected["path"].write_bytes(blob)
    backend = make_backend(tmp_path, **protected["config"], start_degraded=True)
    await backend.start()  # no exception: the gateway serves its other models
    assert backend.ready() is False
    ctx = RequestContext(BufferedRequest("POST", "/v2/models/digits/infer"), "r1", 0.0)
    ctx.route = Route(RouteKind.V2_INFER, "infer", "digits", True)
    ctx.json = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}]}
    with pytest.raises(Unavailable) as info:
        await backend.handle(ctx)
    assert "chunk" not in info.value.message  # the reason is logged for operators, not told to callers
    ctx.route = Route(RouteKind.V2_READY, "read", "digits", False)
    answer = await backend.handle(ctx)
    assert answer.status == 503 and answer.json == {"name": "digits", "ready": False}
