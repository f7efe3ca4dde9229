"""The ``backend:`` section of a model served by the local torch runner.

Kept free of any torch import: the plugin step builds this (and ``findings``
reviews it) for ``maas-gateway check`` on machines where torch may not even be
installed.
Paths are resolved relative to the config file by the typed YAML loader.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gateway.findings import UNSIGNED_ARTIFACT, Finding

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True, slots=True)
class TorchBackendConfig:
    type: str
    path: Path  # safetensors or TorchScript, plain or encrypted (told apart by content)
    arch: str | None = None  # for safetensors: a registered name or "package.module:Class"
    key_env: str | None = None  # env var holding the base64url AES-256 key
    key_file: Path | None = None  # or a file holding it
    verify_key_file: Path | None = None  # Ed25519 public key (PEM): a valid ARTIFACT.sig is then required
    max_batch_size: int = 64  # samples per forward pass
    max_batch_delay_ms: float = 2.0  # how long the first request of a batch waits for company
    max_queue: int = 1024  # requests waiting; beyond it 503 with Retry-After
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = None  # torch intra-op threads; default: half the cores, at most 4
    start_degraded: bool = False  # on a load failure serve the other models (this one 503s) instead of exiting
    input_name: str = "input"
    output_name: str = "output"
    input_shape: list[int] | None = None  # one sample, no batch dimension; default: the arch's
    output_shape: list[int] | None = None
    input_datatype: Literal["BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "BF16", "FP32",
                            "FP64"] = "FP32"  # what the model's forward() takes
    version: str = "1"
    allow_torchscript: bool = False  # TorchScript is code: refused unless set (and then its ops are checked)
    min_version: int | None = None  # refuse a signed artifact whose signed model version is lower
    oms_signature: Path | None = None  # OpenSSF Model Signing bundle over the plaintext model
    oms_public_key: Path | None = None  # its EC public key (PEM) ...
    oms_certificate: Path | None = None  # ... or the certificate chain (PEM) it is checked against

    def validate(self) -> tuple[str, str] | None:
        if self.type != "torch":
            return "type", "expected 'torch'"
        if self.key_env and self.key_file:
            return "key_file", "give key_env or key_file, not both"
        if self.key_env is not None and not _ENV_NAME.match(self.key_env):
            return "key_env", "must be an environment variable name (the key itself never goes in the config)"
        if self.max_batch_size < 1:
            return "max_batch_size", "must be at least 1"
        if not 0 <= self.max_batch_delay_ms <= 10_000:
            return "max_batch_delay_ms", "must be between 0 and 10000"
        if self.max_queue < 1:
            return "max_queue", "must be at least 1"
        if self.threads is not None and not 1 <= self.threads <= 256:
            return "threads", "must be between 1 and 256"
        if self.min_version is not None:
            if self.min_version < 1:
                return "min_version", "must be at least 1"
            if self.verify_key_file is None:
                return "min_version", "needs verify_key_file: only a signed version can be trusted"
        if self.oms_signature is not None and (self.oms_public_key is None) == (self.oms_certificate is None):
            return "oms_signature", "needs oms_public_key or oms_certificate (exactly one)"
        if self.oms_signature is None and (self.oms_public_key or self.oms_certificate):
            return "oms_public_key" if self.oms_public_key else "oms_certificate", "needs oms_signature"
        for key in ("input_shape", "output_shape"):
            shape = getattr(self, key)
            if shape is not None and (not shape or any(d < 1 for d in shape)):
                return key, "must list positive dimensions of one sample (no batch dimension)"
        return None


def verifies_signatures(config: TorchBackendConfig) -> bool:
    """Whether this model is checked against a signing key (ours or an OMS key/certificate)."""
    return config.verify_key_file is not None or config.oms_signature is not None


def findings(name: str, config: TorchBackendConfig) -> list[Finding]:
    """What ``maas-gateway check`` flags in a torch model's section: unsigned, unencrypted, TorchScript.

    An unsigned model is ``medium`` on its own; it is tagged ``UNSIGNED_ARTIFACT``
    so ``check`` raises it to ``high`` when signing keys exist elsewhere in the
    deployment (another model verifies signatures). A ``.sig`` lying beside the
    artifact is a signing key at work too, so that case is ``high`` here.
    """
    out: list[Finding] = []
    path = config.path
    sig = path.with_name(path.name + ".sig")
    verify = config.verify_key_file
    if verify is not None and not sig.is_file():
        out.append(Finding("high", f"models.{name}", f"unsigned model artifact: {sig.name} missing (it will not load)"))
    elif verify is None and sig.is_file():
        out.append(Finding("high", f"models.{name}.backend", "model is signed but verify_key_file is not set: tampering goes unnoticed"))
    elif verify is None and config.oms_signature is None:
        out.append(Finding("medium", f"models.{name}.backend", "model signature not verified (no verify_key_file)",
                           tag=UNSIGNED_ARTIFACT))
    if config.oms_signature is not None and not config.oms_signature.is_file():
        out.append(Finding("high", f"models.{name}.backend.oms_signature",
                           f"OMS signature {config.oms_signature.name} missing (the model will not load)"))
    elif config.oms_signature is not None and importlib.util.find_spec("model_signing") is None:
        out.append(Finding("high", f"models.{name}.backend.oms_signature",
                           "the 'model-signing' package is not installed (pip install 'maas-gateway[oms]'): "
                           "the model will not load"))
    if config.allow_torchscript:
        out.append(Finding("medium", f"models.{name}.backend.allow_torchscript",
                           "TorchScript allowed: the model is code (its operations are checked against the "
                           "allow-list at load)"))
    elif _plain_torchscript(path):
        out.append(Finding("medium", f"models.{name}.backend.path",
                           "TorchScript model: it is code and is refused at load unless allow_torchscript: true"))
    if config.min_version is None and verify is not None:
        out.append(Finding("low", f"models.{name}.backend.min_version",
                           "no min_version: an older signed release copied over this one would be served"))
    if not (config.key_env or config.key_file):
        out.append(Finding("low", f"models.{name}.backend", "model weights are not encrypted at rest"))
    return out


def _plain_torchscript(path: Path) -> bool:
    """Whether ``path`` is an unencrypted TorchScript archive (read from its zip directory, not loaded)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return False  # missing, encrypted or not a zip: nothing to tell without the key
    return any("/code/" in f"/{n}" for n in names) and any(n.endswith("constants.pkl") for n in names)
