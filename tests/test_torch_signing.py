"""Ed25519 artifact signatures: what they bind (content, name, key) and how they fail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backends.torch import signing
from backends.torch.signing import SignatureError

BUNDLED = Path(__file__).resolve().parents[1] / "backends" / "torch" / "assets"


@pytest.fixture
def signed(tmp_path: Path) -> tuple[Path, signing.Ed25519PrivateKey]:
    target = tmp_path / "model.bin"
    target.write_bytes(b"weights" * 1000)
    key = signing.new_signing_key()
    signing.sign_file(target, key)
    return target, key


def test_valid_signature_verifies(signed: tuple[Path, signing.Ed25519PrivateKey]) -> None:
    target, key = signed
    sig = signing.verify_file(target, key.public_key())
    assert sig.name == "model.bin"
    assert sig.key_id == signing.public_key_id(key.public_key())


def test_signature_file_is_small_versioned_json(signed: tuple[Path, signing.Ed25519PrivateKey]) -> None:
    target, _ = signed
    doc = json.loads(signing.signature_path(target).read_text())
    assert doc["format"] == "maas-gateway-signature" and doc["version"] == 2 and doc["algorithm"] == "ed25519"
    assert doc["model_version"] == 1
    assert len(signing.signature_path(target).read_bytes()) < 512


def test_one_changed_byte_fails(signed: tuple[Path, signing.Ed25519PrivateKey]) -> None:
    target, key = signed
    data = bytearray(target.read_bytes())
    data[500] ^= 1
    target.write_bytes(data)
    with pytest.raises(SignatureError, match="SHA-256 differs"):
        signing.verify_file(target, key.public_key())


def test_other_key_fails(signed: tuple[Path, signing.Ed25519PrivateKey]) -> None:
    target, _ = signed
    with pytest.raises(SignatureError, match="signed by another key"):
        signing.verify_file(target, signing.new_signing_key().public_key())


def test_rewritten_descriptive_fields_do_not_help(signed: tuple[Path, signing.Ed25519PrivateKey]) -> None:
    """An attacker edits name/sha256/key_id to match a file of their own: the Ed25519 check still fails."""
    target, key = signed
    target.write_bytes(b"evil weights")
    sig_path = signing.signature_path(target)
    doc = json.loads(sig_path.read_text())
    with open(target, "rb") as f:
        doc["sha256"] = signing.sha256_file(f)
    sig_path.write_text(json.dumps(doc))
    with pytest.raises(SignatureError, match="bad signature"):
        signing.verify_file(target, key.public_key())


def test_name_is_bound(signed: tuple[Path, signing.Ed25519PrivateKey]) -> None:
    target, key = signed
    renamed = target.with_name("other.bin")
    target.rename(renamed)
    signing.signature_path(target).rename(signing.signature_path(renamed))
    with pytest.raises(SignatureError, match="signature is for another model file"):
        signing.verify_file(renamed, key.public_key())
    # even with the name field rewritten, the signed message names model.bin
    sig_path = signing.signature_path(renamed)
    doc = json.loads(sig_path.read_text())
    doc["name"] = "other.bin"
    sig_path.write_text(json.dumps(doc))
    with pytest.raises(SignatureError, match="bad signature"):
        signing.verify_file(renamed, key.public_key())


@pytest.mark.parametrize("content,message", [
    (b"not json", "not valid JSON"),
    (b'{"format": "something-else"}', "not a maas-gateway signature file"),
    (b'{"format": "maas-gateway-signature", "version": 3, "algorithm": "ed25519"}', "unsupported signature version"),
    (b'{"format": "maas-gateway-signature", "version": true, "algorithm": "ed25519"}', "unsupported signature version"),
    (b'{"format": "maas-gateway-signature", "version": 1, "algorithm": "ed25519", "name": "x"}', "lacks"),
    (b"x" * 5000, "too large"),
])
def test_malformed_signature_files(signed: tuple[Path, signing.Ed25519PrivateKey], content: bytes, message: str) -> None:
    target, key = signed
    signing.signature_path(target).write_bytes(content)
    with pytest.raises(SignatureError, match=message):
        signing.verify_file(target, key.public_key())


def test_missing_signature(tmp_path: Path) -> None:
    target = tmp_path / "m.bin"
    target.write_bytes(b"x")
    with pytest.raises(SignatureError, match="not signed: m.bin.sig not found"):
        signing.verify_file(target, signing.new_signing_key().public_key())


def test_key_files_round_trip_and_reject_other_kinds(tmp_path: Path) -> None:
    key = signing.new_signing_key()
    (tmp_path / "k.pem").write_bytes(signing.private_pem(key))
    (tmp_path / "k.pub").write_bytes(signing.public_pem(key.public_key()))
    assert signing.public_key_id(signing.load_private_key(tmp_path / "k.pem").public_key()) == \
        signing.public_key_id(signing.load_public_key(tmp_path / "k.pub"))
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ec_key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "ec.pem").write_bytes(ec_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    with pytest.raises(SignatureError, match="not an Ed25519 key"):
        signing.load_private_key(tmp_path / "ec.pem")
    (tmp_path / "junk.pub").write_text("hello")
    with pytest.raises(SignatureError, match="not a PEM public key"):
        signing.load_public_key(tmp_path / "junk.pub")


def test_bundled_model_is_signed_by_the_bundled_key() -> None:
    public = signing.load_public_key(BUNDLED / "digits_signing.pub")
    signing.verify_file(BUNDLED / "digits.safetensors", public)
