"""Ed25519 signatures over model artifacts: ``ARTIFACT.sig`` beside the file.

The signed message is the artifact's SHA-256, its file name *and the model's
version*, under a versioned context string: a valid signature for
``fraud.safetensors`` does not make a swapped-in ``digits.safetensors`` look
genuine, even when both come from the same signer, and an older signed release
copied back over a newer one (with its ``.sig``) still says it is the older
version, which the backend's ``min_version`` refuses. The signature file is a
small JSON object so a person can read which file, version and key it names;
only the Ed25519 signature decides.

Signature files of format 1 (before versions) keep verifying: their message has
no version, and they count as model version 1, the lowest there is, so a
format-1 file can never pass for a newer release.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIG_SUFFIX = ".sig"
FORMAT = "maas-gateway-signature"
VERSION = 2  # of the signature file format; format 1 (no model version) is still read
_CONTEXTS = {1: b"maas-gateway model signature v1\n", 2: b"maas-gateway model signature v2\n"}
MAX_MODEL_VERSION = 2**53 - 1  # JSON numbers stay exact up to here
_READ_BLOCK = 1 << 20
MAX_SIG_BYTES = 4096  # a signature file is ~300 bytes; refuse to parse anything large


class SignatureError(Exception):
    """The signature is missing, malformed or does not match; ``str()`` is one line."""


@dataclass(frozen=True, slots=True)
class Signature:
    name: str
    sha256: str  # hex
    key_id: str  # hex, 16 chars
    signature: bytes
    model_version: int = 1  # the signed release number (format 1 files: 1)
    format: int = VERSION


def signature_path(artifact: Path) -> Path:
    return artifact.with_name(artifact.name + SIG_SUFFIX)


def public_key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def message(name: str, sha256_hex: str, model_version: int = 1, *, format: int = VERSION) -> bytes:
    """What is signed: format 2 binds the model version too; format 1 (read only) did not."""
    body = _CONTEXTS[format] + name.encode("utf-8") + b"\n" + sha256_hex.encode("ascii")
    return body + f"\n{model_version}".encode("ascii") if format >= 2 else body


# ---------------------------------------------------------------------------
# keys


def new_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    data = _read_small(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise SignatureError(f"{path}: passphrase-protected keys are not supported") from None
    except (ValueError, binascii.Error):
        raise SignatureError(f"{path}: not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path}: not an Ed25519 key (make one with `maas-gateway model keygen --signing`)")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    data = _read_small(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, binascii.Error):
        raise SignatureError(f"{path}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path}: not an Ed25519 public key")
    return key


def _read_small(path: Path, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(64 * 1024)
    except FileNotFoundError:
        raise SignatureError(f"{what} file {path} not found") from None
    except OSError as exc:
        raise SignatureError(f"{what} file {path} cannot be read: {exc.strerror}") from None


# ---------------------------------------------------------------------------
# hashing, signing, verifying


def sha256_file(src: BinaryIO, progress: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    while block := src.read(_READ_BLOCK):
        digest.update(block)
        if progress is not None:
            progress(len(block))
    return digest.hexdigest()


def sign(name: str, sha256_hex: str, key: Ed25519PrivateKey, model_version: int = 1) -> bytes:
    """The signature file's bytes for release ``model_version`` of an artifact ``name`` with digest ``sha256_hex``."""
    if not 1 <= model_version <= MAX_MODEL_VERSION:
        raise SignatureError(f"model version must be between 1 and {MAX_MODEL_VERSION}, got {model_version}")
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "algorithm": "ed25519",
        "name": name,
        "sha256": sha256_hex,
        "model_version": model_version,
        "key_id": public_key_id(key.public_key()),
        "signature": base64.b64encode(key.sign(message(name, sha256_hex, model_version))).decode("ascii"),
    }
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


def parse(data: bytes, *, where: str) -> Signature:
    if len(data) > MAX_SIG_BYTES:
        raise SignatureError(f"{where}: signature file too large")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise SignatureError(f"{where}: signature file is not valid JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SignatureError(f"{where}: not a maas-gateway signature file")
    fmt = doc.get("version")
    if fmt not in _CONTEXTS or type(fmt) is not int or doc.get("algorithm") != "ed25519":
        raise SignatureError(f"{where}: unsupported signature version {doc.get('version')!r} / "
                             f"algorithm {doc.get('algorithm')!r}")
    model_version = doc.get("model_version", 1) if fmt >= 2 else 1
    if type(model_version) is not int or not 1 <= model_version <= MAX_MODEL_VERSION:
        raise SignatureError(f"{where}: model_version must be a whole number from 1")
    fields: dict[str, Any] = {k: doc.get(k) for k in ("name", "sha256", "key_id", "signature")}
    if not all(isinstance(v, str) for v in fields.values()):
        raise SignatureError(f"{where}: signature file lacks name, sha256, key_id or signature")
    try:
        raw = base64.b64decode(fields["signature"], validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"{where}: signature is not base64") from None
    return Signature(fields["name"], fields["sha256"].lower(), fields["key_id"], raw, model_version, fmt)


def read_signature(artifact: Path) -> Signature:
    path = signature_path(artifact)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SIG_BYTES + 1)
    except FileNotFoundError:
        raise SignatureError(f"artifact is not signed: {path.name} not found") from None
    except OSError as exc:
        raise SignatureError(f"{path}: cannot be read: {exc.strerror}") from None
    return parse(data, where=path.name)


def check(signature: Signature, name: str, sha256_hex: str, public: Ed25519PublicKey) -> None:
    """Raise ``SignatureError`` unless ``signature`` is ``public``'s signature of (name, digest).

    The descriptive checks come first only to give a precise message; the
    Ed25519 verification over the *actual* name and digest is what decides.
    """
    if signature.name != name:
        raise SignatureError(f"signature is for another model file ({signature.name!r}, not {name!r})")
    if signature.sha256 != sha256_hex:
        raise SignatureError("artifact does not match its signature (SHA-256 differs: tampered or replaced)")
    expected_id = public_key_id(public)
    if signature.key_id != expected_id:
        raise SignatureError(f"signed by another key (key id {signature.key_id}, trusted key is {expected_id})")
    try:
        public.verify(signature.signature, message(name, sha256_hex, signature.model_version, format=signature.format))
    except InvalidSignature:
        raise SignatureError("bad signature (the signature file was altered or made with another key)") from None


def sign_file(artifact: Path, key: Ed25519PrivateKey, progress: Callable[[int], None] | None = None,
              model_version: int = 1) -> Path:
    with open(artifact, "rb") as f:
        digest = sha256_file(f, progress)
    out = signature_path(artifact)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.write_bytes(sign(artifact.name, digest, key, model_version))
    os.replace(tmp, out)
    return out


def verify_file(artifact: Path, public: Ed25519PublicKey, progress: Callable[[int], None] | None = None) -> Signature:
    signature = read_signature(artifact)
    try:
        with open(artifact, "rb") as f:
            digest = sha256_file(f, progress)
    except FileNotFoundError:
        raise SignatureError(f"artifact {artifact} not found") from None
    check(signature, artifact.name, digest, public)
    return signature
