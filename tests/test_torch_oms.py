"""OpenSSF Model Signing interop: signatures made by the real ``model_signing`` tool, checked by us.

Signed as a publisher would (the ``model_signing sign key`` CLI; certificate mode
through its Python API with a CA made here), verified by ``maas-gateway model
verify --oms`` on plain files and folders, and by the torch backend over the
plaintext of an encrypted artifact.
"""

from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("model_signing")
pytest.importorskip("OpenSSL")

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

from backends.torch import artifact, oms  # noqa: E402
from backends.torch.loader import ModelLoadError, OmsTrust, check_oms  # noqa: E402
from gateway.cli import main  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "backends" / "torch" / "assets"


def ec_pair(directory: Path, name: str, curve: ec.EllipticCurve | None = None) -> tuple[Path, Path]:
    key = ec.generate_private_key(curve or ec.SECP256R1())
    private, public = directory / f"{name}.pem", directory / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def sign_with_cli(model: Path, private: Path, signature: Path) -> None:
    """What a publisher runs: the model_signing tool's own CLI, key mode."""
    proc = subprocess.run([sys.executable, "-m", "model_signing", "sign", "key", str(model),
                           "--private_key", str(private), "--signature", str(signature)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def verify(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    try:
        code = main(["model", "verify", *argv])
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1()], ids=["p256", "p384"])
def test_cli_signed_model_verifies_and_fails_after_one_byte(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           curve: ec.EllipticCurve) -> None:
    model = tmp_path / "model.safetensors"
    model.write_bytes((ASSETS / "digits.safetensors").read_bytes())
    private, public = ec_pair(tmp_path, "publisher", curve)
    sign_with_cli(model, private, tmp_path / "model.sig")
    code, text = verify(capsys, str(model), "--oms", str(tmp_path / "model.sig"), "--oms-key", str(public))
    assert code == 0 and "OMS signature valid (key mode)" in text
    data = bytearray(model.read_bytes())
    data[100] ^= 1
    model.write_bytes(data)
    code, text = verify(capsys, str(model), "--oms", str(tmp_path / "model.sig"), "--oms-key", str(public))
    assert code == 1 and "does not verify" in text and "Traceback" not in text and text.count("\n") == 1


def test_wrong_key_and_missing_signature_fail(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model.bin"
    model.write_bytes(b"weights" * 500)
    private, _ = ec_pair(tmp_path, "publisher")
    _, other = ec_pair(tmp_path, "other")
    sign_with_cli(model, private, tmp_path / "model.sig")
    code, text = verify(capsys, str(model), "--oms", str(tmp_path / "model.sig"), "--oms-key", str(other))
    assert code == 1 and "does not verify" in text
    code, text = verify(capsys, str(model), "--oms", str(tmp_path / "nope.sig"), "--oms-key", str(other))
    assert code == 1 and "not found" in text
    code, text = verify(capsys, str(model), "--oms", str(tmp_path / "model.sig"))
    assert code != 0 and "--oms-key" in text


def test_a_signed_folder_verifies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"layers": 2}')
    (folder / "weights.bin").write_bytes(b"w" * 4096)
    private, public = ec_pair(tmp_path, "publisher")
    sign_with_cli(folder, private, tmp_path / "model.sig")
    assert verify(capsys, str(folder), "--oms", str(tmp_path / "model.sig"), "--oms-key", str(public))[0] == 0
    (folder / "extra.py").write_text("import os")
    code, text = verify(capsys, str(folder), "--oms", str(tmp_path / "model.sig"), "--oms-key", str(public))
    assert code == 1 and "extra.py" in text


def _certificate(subject: str, key: Any, issuer: x509.Name | None, issuer_key: Any, *, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=not ca, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=ca,
                                            crl_sign=ca, encipher_only=False, decipher_only=False), critical=True))
    return builder.sign(issuer_key, hashes.SHA256())


def test_certificate_mode_with_a_private_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import model_signing

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("Model CA", ca_key, None, ca_key, ca=True)
    leaf = _certificate("publisher", leaf_key, ca.subject, ca_key, ca=False)
    pem = serialization.Encoding.PEM
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(pem))
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(pem))
    (tmp_path / "leaf.key").write_bytes(leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                               serialization.NoEncryption()))
    model = tmp_path / "model.bin"
    model.write_bytes(b"weights" * 500)
    (model_signing.signing.Config()
     .use_certificate_signer(private_key=tmp_path / "leaf.key", signing_certificate=tmp_path / "leaf.pem",
                             certificate_chain=[tmp_path / "ca.pem"])
     .sign(model, tmp_path / "model.sig"))
    code, text = verify(capsys, str(model), "--oms", str(tmp_path / "model.sig"), "--oms-cert", str(tmp_path / "ca.pem"))
    assert code == 0 and "certificate mode" in text
    other_key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "other-ca.pem").write_bytes(_certificate("Other CA", other_key, None, other_key, ca=True).public_bytes(pem))
    code, text = verify(capsys, str(model), "--oms", str(tmp_path / "model.sig"), "--oms-cert",
                        str(tmp_path / "other-ca.pem"))
    assert code == 1 and "does not verify" in text


def test_plaintext_check_in_memory(tmp_path: Path) -> None:
    model = tmp_path / "model.bin"
    model.write_bytes(b"weights" * 500)
    private, public = ec_pair(tmp_path, "publisher")
    sign_with_cli(model, private, tmp_path / "model.sig")
    trust = OmsTrust(tmp_path / "model.sig", public_key=public)
    assert check_oms(model.read_bytes(), trust) == "model.bin"
    with pytest.raises(ModelLoadError, match="oms_signature: decrypted model does not match its OMS signature"):
        check_oms(model.read_bytes()[:-1] + b"X", trust)
    with pytest.raises(ModelLoadError, match="does not match its OMS signature"):
        check_oms(model.read_bytes() + b"X", trust)


def test_missing_library_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "model_signing.verifying", None)  # import fails as if not installed
    with pytest.raises(oms.OmsError, match=r"pip install 'maas-gateway\[oms\]'"):
        oms.verify_path(tmp_path, tmp_path / "x.sig", public_key=tmp_path / "k.pub")


async def test_encrypted_artifact_protected_end_to_end(tmp_path: Path) -> None:
    """The publisher signs the plain model; we store it encrypted; the backend checks the plaintext it decrypts."""
    from gateway.errors import ConfigError
    from tests.test_torch_backend import make_backend

    plain = tmp_path / "digits.safetensors"
    plain.write_bytes((ASSETS / "digits.safetensors").read_bytes())
    private, public = ec_pair(tmp_path, "publisher")
    sign_with_cli(plain, private, tmp_path / "digits.oms.sig")
    key = artifact.new_key()
    (tmp_path / "aes.key").write_text(artifact.encode_key(key))
    with open(plain, "rb") as src, open(tmp_path / "digits.safetensors.enc", "wb") as dst:
        artifact.encrypt_stream(src, dst, key)
    plain.unlink()  # only the ciphertext stays at rest
    section = {"path": "digits.safetensors.enc", "arch": "digits-mlp", "key_file": "aes.key",
               "oms_signature": "digits.oms.sig", "oms_public_key": "publisher.pub"}
    backend = make_backend(tmp_path, **section)
    await backend.start()
    try:
        assert backend.ready() and backend.info["oms"] and backend.info["encrypted"]
    finally:
        await backend.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["aes.key", "digits.oms.sig", "digits.safetensors.enc", "publisher.pem", "publisher.pub"])  # no plaintext left

    # another model, encrypted under the same key: decrypts fine, but is not what the publisher signed
    other = bytearray((ASSETS / "digits.safetensors").read_bytes())
    other[-1] ^= 1
    with open(tmp_path / "digits.safetensors.enc", "wb") as dst:
        import io

        artifact.encrypt_stream(io.BytesIO(bytes(other)), dst, key)
    with pytest.raises(ConfigError, match="oms_signature: decrypted model does not match its OMS signature"):
        await make_backend(tmp_path, **section).start()
    _, stranger = ec_pair(tmp_path, "stranger")
    with pytest.raises(ConfigError, match="oms_signature: OMS signature does not verify"):
        await make_backend(tmp_path, **{**section, "oms_public_key": stranger.name}).start()
