"""Versioned signatures and what ``check`` says about model artifacts.

The rollback attack: copy an older signed release and its ``.sig`` over the new
one. Its signature is genuine — ``model verify`` still calls it valid — but it
says version 1, and a backend with ``min_version: 2`` refuses it, naming both.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

from backends.torch import TorchBackendConfig, signing
from backends.torch.config import findings
from gateway.cli import main
from gateway.errors import ConfigError

ASSETS = Path(__file__).resolve().parents[1] / "backends" / "torch" / "assets"


def write_config(tmp_path: Path, *, models: dict[str, Any]) -> Path:
    import yaml

    path = tmp_path / "gateway.yaml"
    config = {"server": {"host": "127.0.0.1", "port": 8080}, "auth": {"api_keys": {"file": "keys.yaml"}},
              "models": models}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture
def releases(tmp_path: Path) -> dict[str, Path]:
    """Release 1 and release 2 of digits.safetensors, each signed with its version, in their own folders."""
    assert main(["model", "keygen", "--signing", "--out", str(tmp_path / "signer")]) == 0
    out: dict[str, Path] = {}
    for version in ("1", "2"):
        folder = tmp_path / f"v{version}"
        folder.mkdir()
        data = bytearray((ASSETS / "digits.safetensors").read_bytes())
        data[-1] ^= int(version) - 1  # a different file per release (the last weight's last byte)
        (folder / "digits.safetensors").write_bytes(data)
        assert main(["model", "sign", str(folder / "digits.safetensors"), "--key", str(tmp_path / "signer"),
                     "--version", version]) == 0
        out[version] = folder / "digits.safetensors"
    return out


def test_verify_prints_the_signed_version(releases: dict[str, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, text = cli(capsys, "model", "verify", str(releases["2"]), "--pub", str(tmp_path / "signer.pub"))
    assert code == 0 and "signature valid (model version 2," in text
    doc = json.loads(signing.signature_path(releases["2"]).read_text())
    assert doc["version"] == 2 and doc["model_version"] == 2


def test_an_edited_version_breaks_the_signature(releases: dict[str, Path], tmp_path: Path) -> None:
    sig = signing.signature_path(releases["1"])
    doc = json.loads(sig.read_text())
    doc["model_version"] = 9
    sig.write_text(json.dumps(doc))
    with pytest.raises(signing.SignatureError, match="bad signature"):
        signing.verify_file(releases["1"], signing.load_public_key(tmp_path / "signer.pub"))


def test_old_signature_files_verify_as_version_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert json.loads((ASSETS / "digits.safetensors.sig").read_text())["version"] == 1  # made before versions
    code, text = cli(capsys, "model", "verify", str(ASSETS / "digits.safetensors"), "--pub",
                     str(ASSETS / "digits_signing.pub"))
    assert code == 0 and "model version 1," in text


def test_bad_version_argument_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "m").write_bytes(b"x")
    main(["model", "keygen", "--signing", "--out", str(tmp_path / "k")])
    code, text = cli(capsys, "model", "sign", str(tmp_path / "m"), "--key", str(tmp_path / "k"), "--version", "0")
    assert code != 0 and "--version must be between 1 and" in text and "Traceback" not in text


async def test_min_version_refuses_a_rolled_back_artifact(releases: dict[str, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from tests.test_torch_backend import make_backend

    served = releases["2"].parent
    section = {"path": "digits.safetensors", "arch": "digits-mlp", "verify_key_file": "../signer.pub",
               "min_version": 2}
    backend = make_backend(served, **section)
    await backend.start()
    assert backend.info["model_version"] == 2
    await backend.close()
    # the attacker copies release 1 and its genuine .sig over release 2
    shutil.copy(releases["1"], served / "digits.safetensors")
    shutil.copy(signing.signature_path(releases["1"]), served / "digits.safetensors.sig")
    code, text = cli(capsys, "model", "verify", str(served / "digits.safetensors"), "--pub", str(tmp_path / "signer.pub"))
    assert code == 0 and "model version 1," in text  # a genuine signature...
    with pytest.raises(ConfigError, match="signed as model version 1, older than min_version 2"):
        await make_backend(served, **section).start()  # ...of a release too old to serve


def test_a_signature_renamed_to_another_file_is_refused(releases: dict[str, Path], tmp_path: Path) -> None:
    other = releases["1"].with_name("fraud.safetensors")
    shutil.copy(releases["1"], other)
    shutil.copy(signing.signature_path(releases["1"]), signing.signature_path(other))
    with pytest.raises(signing.SignatureError, match="signature is for another model file"):
        signing.verify_file(other, signing.load_public_key(tmp_path / "signer.pub"))


# -- config errors and check findings ----------------------------------------------------------------------------


@pytest.mark.parametrize("extra, key, message", [
    ({"min_version": 2}, "min_version", "needs verify_key_file"),
    ({"min_version": 0, "verify_key_file": "k.pub"}, "min_version", "must be at least 1"),
    ({"oms_signature": "m.sig"}, "oms_signature", "needs oms_public_key or oms_certificate"),
    ({"oms_public_key": "k.pem"}, "oms_public_key", "needs oms_signature"),
    ({"allow_torchscript": "maybe"}, "allow_torchscript", ""),
])
def test_config_mistakes_name_file_line_and_key(tmp_path: Path, extra: dict[str, Any], key: str, message: str) -> None:
    backend = {"type": "torch", "path": "m.safetensors", "arch": "digits-mlp", **extra}
    path = write_config(tmp_path, models={"m": {"backend": backend}})
    proc = subprocess.run([sys.executable, "-m", "gateway", "check", "-c", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    err = proc.stderr.strip()
    assert err.count("\n") == 0 and str(path.name) in err and key in err and message in err, err


def _torchscript(path: Path) -> None:
    import torch

    from backends.torch.archs import DigitsMLP

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(DigitsMLP()), buffer)
    path.write_bytes(buffer.getvalue())


def test_check_reports_every_torchscript_model(tmp_path: Path) -> None:
    _torchscript(tmp_path / "m.pt")
    plain = [(f.severity, f.where) for f in findings("m", TorchBackendConfig("torch", tmp_path / "m.pt"))]
    assert ("medium", "models.m.backend.path") in plain
    allowed = findings("m", TorchBackendConfig("torch", tmp_path / "m.pt.enc", allow_torchscript=True))
    assert [f for f in allowed if f.severity == "medium" and "TorchScript allowed" in f.message]
    safetensors = findings("m", TorchBackendConfig("torch", ASSETS / "digits.safetensors",
                                                   verify_key_file=ASSETS / "digits_signing.pub"))
    assert not [f for f in safetensors if "TorchScript" in f.message]


def test_check_raises_an_unsigned_model_to_high_when_signing_keys_exist(tmp_path: Path) -> None:
    shutil.copy(ASSETS / "digits.safetensors", tmp_path / "signed.safetensors")
    shutil.copy(ASSETS / "digits.safetensors.sig", tmp_path / "signed.safetensors.sig")
    shutil.copy(ASSETS / "digits_signing.pub", tmp_path / "signing.pub")
    shutil.copy(ASSETS / "digits.safetensors", tmp_path / "unsigned.safetensors")
    signed = {"type": "torch", "path": "signed.safetensors", "arch": "digits-mlp", "verify_key_file": "signing.pub"}
    unsigned = {"type": "torch", "path": "unsigned.safetensors", "arch": "digits-mlp"}

    def check(models: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        path = write_config(tmp_path, models={name: {"backend": b} for name, b in models.items()})
        return subprocess.run([sys.executable, "-m", "gateway", "check", "-c", str(path)], capture_output=True,
                              text=True, timeout=60)

    alone = check({"b": unsigned})
    assert "MEDIUM models.b.backend: model signature not verified" in alone.stdout
    both = check({"a": signed, "b": unsigned})
    assert both.returncode == 1, both.stdout + both.stderr
    line = next(ln for ln in both.stdout.splitlines() if "models.b.backend:" in ln and "signature" in ln)
    assert line.startswith("HIGH") and "signing keys exist" in line and "models a" in line
