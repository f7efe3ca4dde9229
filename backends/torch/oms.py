"""OpenSSF Model Signing (``model_signing``) signatures: verify only, key or certificate mode.

A publisher signs the plain model with ``model_signing sign key`` (or
``sign certificate``): a Sigstore bundle whose DSSE payload lists the digest of
every file (or shard) of the model. Two ways to check one here:

* ``verify_path`` — a plain file or folder on disk, through the library's public
  ``verifying.Config`` (``maas-gateway model verify ARTIFACT --oms SIG``).
* ``verify_plaintext`` — the bytes the torch backend has just decrypted. The
  signature is over the *plaintext*, so it survives encryption at rest; the
  plaintext never goes back to disk to be checked: the library verifies the
  bundle and yields the manifest it signs, and the digests are computed here
  over the bytes in memory — the very bytes that are then loaded.

Sigstore keyless mode is not offered: it needs a transparency log and Fulcio
trust root fetched online (or a hand-kept trust config), and a gateway that
must start offline cannot depend on that.

``model_signing`` is an optional dependency (``pip install 'maas-gateway[oms]'``):
a config that asks for OMS without it fails with that instruction, never a
traceback. It needs ``pyopenssl`` at import time without declaring it, so the
extra lists both.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Callable

MISSING = ("OpenSSF Model Signing needs the optional 'model-signing' package: "
           "pip install 'maas-gateway[oms]' (model-signing and pyopenssl)")


class OmsError(Exception):
    """The OMS signature is missing, malformed or does not match; ``str()`` is one line."""


def _library() -> Any:
    try:
        logging.getLogger("sigstore").setLevel(logging.ERROR)
        import model_signing.verifying  # noqa: F401  (needs pyopenssl, which it does not declare)
        from model_signing._signing import sign_sigstore_pb
    except ImportError:
        raise OmsError(MISSING) from None
    return model_signing, sign_sigstore_pb


def _config(*, public_key: Path | None, certificate: Path | None) -> Any:
    """A ``verifying.Config`` for a key (EC P-256/384/521 public key PEM) or a certificate chain (PEM)."""
    model_signing, _ = _library()
    if (public_key is None) == (certificate is None):
        raise OmsError("give an OMS public key or an OMS certificate chain, exactly one")
    trust = public_key if public_key is not None else certificate
    assert trust is not None
    if not trust.is_file():
        raise OmsError(f"{trust}: file not found")
    try:
        config = model_signing.verifying.Config()
        if public_key is not None:
            return config.use_elliptic_key_verifier(public_key=public_key)
        return config.use_certificate_verifier(certificate_chain=[certificate])
    except Exception as exc:  # ValueError/UnsupportedAlgorithm from cryptography: not a usable key
        raise OmsError(f"{trust}: not a usable OMS {'public key' if public_key else 'certificate'}: "
                       f"{_one_line(exc)}") from None


def verify_path(model: Path, signature: Path, *, public_key: Path | None = None,
                certificate: Path | None = None) -> None:
    """Check ``signature`` over the plain file or folder ``model``; ``OmsError`` naming what differs."""
    config = _config(public_key=public_key, certificate=certificate)
    if not signature.is_file():
        raise OmsError(f"OMS signature {signature} not found")
    if not model.exists():
        raise OmsError(f"model {model} not found")
    try:
        config.verify(model, signature)
    except Exception as exc:  # the library raises ValueError, KeyError, cryptography errors, ...
        raise OmsError(f"OMS signature does not verify: {_one_line(exc)}") from None


def signed_manifest(signature: Path, *, public_key: Path | None = None, certificate: Path | None = None) -> Any:
    """The manifest ``signature`` signs, once its signature and trust chain are checked."""
    config = _config(public_key=public_key, certificate=certificate)
    _, sign_sigstore_pb = _library()
    try:
        bundle = sign_sigstore_pb.Signature.read(signature)
    except FileNotFoundError:
        raise OmsError(f"OMS signature {signature} not found") from None
    except Exception as exc:
        raise OmsError(f"{signature}: not an OMS signature bundle: {_one_line(exc)}") from None
    try:
        return config._verifier.verify(bundle)  # the public Config.verify would hash files on disk
    except Exception as exc:
        raise OmsError(f"OMS signature does not verify: {_one_line(exc)}") from None


def verify_plaintext(data: bytes, signature: Path, *, public_key: Path | None = None,
                     certificate: Path | None = None) -> str:
    """Check that ``signature`` signs exactly ``data`` (a one-file model); the name the publisher signed."""
    manifest = signed_manifest(signature, public_key=public_key, certificate=certificate)
    params = manifest.serialization_type
    method = params.get("method")
    expected = {rd.identifier: rd.digest for rd in manifest.resource_descriptors()}
    hasher = _hasher(str(params.get("hash_type")))
    if method == "files":
        if list(expected) != ["."]:
            raise OmsError(f"OMS signature covers a folder ({len(expected)} files); a served artifact is one file")
        actual = {".": hasher(data)}
    elif method == "shards":
        size = int(params["shard_size"])
        actual = {f".:{start}:{min(start + size, len(data))}": hasher(data[start:start + size])
                  for start in range(0, max(len(data), 1), size)}
        if any(not name.startswith(".:") for name in expected):
            raise OmsError("OMS signature covers a folder; a served artifact is one file")
    else:
        raise OmsError(f"OMS signature uses an unknown serialization {method!r}")
    if set(actual) != set(expected):
        raise OmsError("decrypted model does not match its OMS signature (its size differs from what was signed)")
    for name, digest in expected.items():
        if digest.digest_value != actual[name]:
            raise OmsError("decrypted model does not match its OMS signature (digest differs: tampered or replaced)")
    return str(manifest.model_name)


def _hasher(hash_type: str) -> Callable[[bytes], bytes]:
    if hash_type == "sha256":
        return lambda b: hashlib.sha256(b).digest()
    if hash_type in ("blake2", "blake2b"):
        return lambda b: hashlib.blake2b(b).digest()
    if hash_type == "blake3":
        import blake3

        return lambda b: blake3.blake3(b).digest()  # type: ignore[no-any-return]
    raise OmsError(f"OMS signature uses an unknown hash {hash_type!r}")


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__
