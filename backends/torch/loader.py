"""Reading a model artifact safely: decrypt, check its signature, tell its format by content, load it.

The order matters. The file is read once: every byte is hashed (for the
signature) and, when encrypted, authenticated chunk by chunk while it is read,
so what is checked is exactly what is loaded. Nothing parses the plaintext
until both checks have passed. The format is then told by content, never by
file name: safetensors (tensors only) goes into a trusted architecture;
TorchScript is code, so it is refused unless the backend allows it, and then
checked before and after loading (``torchscript_guard``); anything pickled is
refused, because unpickling runs whatever code the file's author chose.

After the signature, two more checks on what was read: the signed model version
against ``min_version`` (a rolled-back release is refused), and an OpenSSF Model
Signing signature (``oms``) over the plaintext, computed in memory, so a
publisher's signature keeps protecting a model we store encrypted.

Memory: decryption holds two chunks at a time; the plaintext is then gathered
once (safetensors parses from bytes), so the peak is about twice the model —
its plaintext plus its tensors — never the ciphertext too.
"""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import artifact, signing
from .artifact import ArtifactError, KeyProblem
from .signing import SignatureError

TORCHSCRIPT_REFUSAL = ("this is a TorchScript model: a program, not just weights — it can read files (the "
                       "gateway's keys), write them or open sockets; set allow_torchscript: true to serve it after "
                       "its operations are checked against an allow-list of pure tensor math, or ship safetensors "
                       "weights with an `arch`")

PICKLE_REFUSAL = ("pickle files can execute code when loaded; convert to safetensors "
                  "(safetensors.torch.save_file(model.state_dict(), 'model.safetensors'))")
TORCH_SAVE_REFUSAL = ("this is a torch.save checkpoint: a zip of pickled Python objects, which can execute code "
                      "when loaded; convert to safetensors (safetensors.torch.save_file(state_dict, ...))")
_READ_BLOCK = 1 << 20


class ModelLoadError(Exception):
    """The model must not be served; ``str()`` is one line saying why."""


@dataclass(slots=True)
class Verified:
    """An artifact's plaintext once decryption and signature checks passed."""

    data: bytes
    sha256: str  # of the file as stored (ciphertext when encrypted)
    encrypted: bool
    signed: bool
    key_id: str | None = None
    model_version: int | None = None  # the signed release number, when signed
    oms_name: str | None = None  # the model name an OpenSSF Model Signing signature vouches for


@dataclass(frozen=True, slots=True)
class OmsTrust:
    """An OpenSSF Model Signing signature to check over the plaintext, and what to check it against."""

    signature: Path
    public_key: Path | None = None
    certificate: Path | None = None


def read_verified(path: Path, *, key: bytes | None, verify_key: Any = None,
                  progress: Callable[[int], None] | None = None, min_version: int | None = None,
                  oms: OmsTrust | None = None) -> Verified:
    """Read ``path`` once, decrypting with ``key`` and checking its signature against ``verify_key``.

    A configured key and a plaintext file is a refusal, never a fallback: an
    attacker who can write the file must not be able to swap the encrypted
    model for a plaintext one of their own.
    """
    signature = None
    if verify_key is not None:
        try:
            signature = signing.read_signature(path) if path.is_file() else None
        except SignatureError as exc:
            raise ModelLoadError(str(exc)) from None
    digest = hashlib.sha256()
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise ModelLoadError(f"model file {path} not found") from None
    except IsADirectoryError:
        raise ModelLoadError(f"model path {path} is a directory, expected a file") from None
    except OSError as exc:
        raise ModelLoadError(f"model file {path} cannot be read: {exc.strerror}") from None
    with f:
        head = f.read(len(artifact.MAGIC))
        f.seek(0)
        encrypted = artifact.is_encrypted(head)
        try:
            if encrypted:
                if key is None:
                    raise ModelLoadError("artifact is encrypted but no key_env or key_file is configured")
                parts = list(artifact.decrypt_chunks(f, key, progress=progress, observe=digest.update))
                data = b"".join(parts)
                del parts
            else:
                if key is not None:
                    raise ModelLoadError("a key is configured but the artifact is not encrypted (or its header is "
                                         "corrupted); refusing to load it as plaintext")
                blocks = []
                while block := f.read(_READ_BLOCK):
                    digest.update(block)
                    blocks.append(block)
                    if progress is not None:
                        progress(len(block))
                data = b"".join(blocks)
                del blocks
        except ArtifactError as exc:
            raise ModelLoadError(str(exc)) from None
    sha = digest.hexdigest()
    if verify_key is not None:
        assert signature is not None
        try:
            signing.check(signature, path.name, sha, verify_key)
        except SignatureError as exc:
            raise ModelLoadError(str(exc)) from None
        if min_version is not None and signature.model_version < min_version:
            raise ModelLoadError(f"artifact is signed as model version {signature.model_version}, older than "
                                 f"min_version {min_version}: refusing a rolled-back release")
    elif min_version is not None:
        raise ModelLoadError("min_version needs verify_key_file: an unsigned artifact has no trustworthy version")
    oms_name = check_oms(data, oms) if oms is not None else None
    return Verified(data, sha, encrypted, verify_key is not None,
                    artifact.key_id(key).hex() if key is not None else None,
                    signature.model_version if signature is not None else None, oms_name)


def check_oms(data: bytes, trust: OmsTrust) -> str:
    """The OMS signature over the plaintext ``data`` (in memory: it never goes back to disk to be hashed)."""
    from .oms import OmsError, verify_plaintext

    try:
        return verify_plaintext(data, trust.signature, public_key=trust.public_key, certificate=trust.certificate)
    except OmsError as exc:
        raise ModelLoadError(f"oms_signature: {exc}") from None


def load_key(*, key_env: str | None, key_file: Path | None) -> bytes | None:
    try:
        if key_env:
            return artifact.key_from_env(key_env)
        if key_file is not None:
            return artifact.key_from_file(key_file)
    except KeyProblem as exc:
        raise ModelLoadError(str(exc)) from None
    return None


def load_verify_key(path: Path | None) -> Any:
    if path is None:
        return None
    try:
        return signing.load_public_key(path)
    except SignatureError as exc:
        raise ModelLoadError(f"verify_key_file: {exc}") from None


# ---------------------------------------------------------------------------
# formats


def sniff(data: bytes) -> str:
    """``safetensors``, ``torchscript``, ``torch-save``, ``pickle`` or ``unknown`` — by content alone."""
    if len(data) >= 10:
        (header_len,) = struct.unpack_from("<Q", data)
        if 2 <= header_len <= len(data) - 8 and data[8:9] == b"{":
            return "safetensors"
    if data[:4] == b"PK\x03\x04":
        try:
            names = zipfile.ZipFile(io.BytesIO(data)).namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return "unknown"
        if any("/code/" in n or n.startswith("code/") for n in names) and any(n.endswith("constants.pkl") for n in names):
            return "torchscript"
        if any(n.endswith("data.pkl") for n in names):
            return "torch-save"
        return "unknown"
    if len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5:
        return "pickle"
    return "unknown"


@dataclass(slots=True)
class LoadedModel:
    module: Any  # torch.nn.Module or torch.jit.ScriptModule, in eval mode, on ``device``
    format: str  # "safetensors" | "torchscript"
    arch: str | None
    input_shape: tuple[int, ...] | None  # one sample, without the batch dimension
    output_shape: tuple[int, ...] | None
    device: str


def load_module(data: bytes, *, arch: str | None, device: str, allow_torchscript: bool = False) -> LoadedModel:
    """Turn verified plaintext into a module, or refuse it with the reason."""
    import torch

    kind = sniff(data)
    if kind == "pickle":
        raise ModelLoadError(PICKLE_REFUSAL)
    if kind == "torch-save":
        raise ModelLoadError(TORCH_SAVE_REFUSAL)
    if kind == "unknown":
        raise ModelLoadError("unrecognised model format: expected safetensors or TorchScript")
    if kind == "torchscript":
        if not allow_torchscript:
            raise ModelLoadError(TORCHSCRIPT_REFUSAL)
        return _load_torchscript(torch, data, device)
    if not arch:
        raise ModelLoadError("safetensors weights need `arch:` (a registered name or 'package.module:Class')")
    from safetensors.torch import load as load_safetensors

    from .archs import ArchError

    try:
        tensors = load_safetensors(data)
    except Exception as exc:  # SafetensorError: a malformed header or truncated data
        raise ModelLoadError(f"safetensors file is malformed: {_first_line(exc)}") from None
    try:
        module = _into_arch(torch, arch, tensors)
    except ArchError as exc:
        raise ModelLoadError(str(exc)) from None
    except RuntimeError as exc:
        raise ModelLoadError(f"weights do not fit arch {arch!r}: {_state_dict_problem(exc)}") from None
    del tensors
    module.to(device).eval()
    return LoadedModel(module, kind, arch, _shape(getattr(module, "input_shape", None)),
                       _shape(getattr(module, "output_shape", None)), device)


def _load_torchscript(torch: Any, data: bytes, device: str) -> LoadedModel:
    """Prescan, load, then walk every graph; the shapes the model declares, if any.

    A model declares its sample shape with an ``input_shape`` (and ``output_shape``)
    attribute — a list of ints, -1 for any size — or an extra file of that name
    holding a JSON list (``torch.jit.save(m, f, _extra_files={"input_shape": "[64]"})``).
    """
    from .torchscript_guard import TorchScriptRefused, check_module, prescan

    extra = {"input_shape": "", "output_shape": ""}
    try:
        prescan(data)
        try:
            with warnings.catch_warnings():  # torch >= 2.9 flags TorchScript as deprecated; it is still supported here
                warnings.simplefilter("ignore", DeprecationWarning)
                module = torch.jit.load(io.BytesIO(data), map_location=device, _extra_files=extra)
        except Exception as exc:  # torch raises RuntimeError with multi-line C++ context
            raise ModelLoadError(f"TorchScript archive cannot be loaded: {_first_line(exc)}") from None
        check_module(module)
    except TorchScriptRefused as exc:
        raise ModelLoadError(str(exc)) from None
    module.eval()
    return LoadedModel(module, "torchscript", None, _declared(module, extra, "input_shape"),
                       _declared(module, extra, "output_shape"), device)


def _declared(module: Any, extra: dict[str, Any], name: str) -> tuple[int, ...] | None:
    """A shape the TorchScript model declares (attribute, else extra file); None when it declares none."""
    import json

    value: Any = None
    try:
        value = getattr(module, name)
    except Exception:  # no such attribute: a ScriptModule raises its own error types
        raw = extra.get(name)
        if raw:
            try:
                value = json.loads(raw)
            except ValueError:
                value = None
    if (isinstance(value, (list, tuple)) and value
            and all(type(d) is int and (d >= 1 or d == -1) for d in value)):
        return tuple(value)
    return None


def _into_arch(torch: Any, arch: str, tensors: dict[str, Any]) -> Any:
    """Build ``arch`` and load ``tensors`` into it (strict: every name and shape must match).

    The module is first built on the ``meta`` device and the loaded tensors are
    assigned to it, so weights exist once (not random init + a copy): for a
    multi-GB model that halves peak memory and skips a slow random init. An
    arch that cannot be built that way, or that keeps non-persistent buffers,
    is built normally and the weights copied in.
    """
    from .archs import instantiate

    try:
        with torch.device("meta"):
            module = instantiate(arch)
    except Exception:
        module = None
    if module is not None:
        expected = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        for name, tensor in list(tensors.items()):
            ref = expected.get(name)
            if ref is not None and ref.dtype != tensor.dtype and ref.is_floating_point() and tensor.is_floating_point():
                tensors[name] = tensor.to(ref.dtype)  # what a copy into the parameter would have done
        module.load_state_dict(tensors, strict=True, assign=True)
        if not any(t.is_meta for t in (*module.parameters(), *module.buffers())):
            return module
    module = instantiate(arch)
    module.load_state_dict(tensors, strict=True)
    return module


def _shape(value: Any) -> tuple[int, ...] | None:
    return tuple(int(v) for v in value) if value is not None else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _state_dict_problem(exc: RuntimeError) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()]
    return "; ".join(lines)[:400] or _first_line(exc)
