"""``maas-gateway model keygen | encrypt | decrypt | sign | verify`` through the real command line."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pytest

from backends.torch import artifact
from backends.torch.cli import ProgressBar
from gateway.cli import main

BUNDLED = Path(__file__).resolve().parents[1] / "backends" / "torch" / "assets" / "digits.safetensors"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def run(*argv: str) -> int:
    return main(list(argv))


def test_keygen_writes_a_0600_base64url_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key_file = tmp_path / "model.key"
    assert run("model", "keygen", "--out", str(key_file)) == 0
    assert mode(key_file) == 0o600
    text = key_file.read_text()
    assert text.count("\n") == 1 and len(artifact.decode_key(text, where="k")) == 32
    assert text.strip() not in capsys.readouterr().err  # never echoed


def test_keygen_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key_file = tmp_path / "model.key"
    key_file.write_text("precious\n")
    assert run("model", "keygen", "--out", str(key_file)) == 1
    assert "already exists" in capsys.readouterr().err
    assert key_file.read_text() == "precious\n"
    assert run("model", "keygen", "--out", str(key_file), "--force") == 0
    assert key_file.read_text() != "precious\n" and mode(key_file) == 0o600


def test_keygen_to_stdout_for_a_secret_store(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("model", "keygen", "--out", "-") == 0
    assert len(artifact.decode_key(capsys.readouterr().out, where="stdout")) == 32


def test_keygen_signing_pair(tmp_path: Path) -> None:
    out = tmp_path / "signing.pem"
    assert run("model", "keygen", "--signing", "--out", str(out)) == 0
    assert mode(out) == 0o600 and out.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    pub = tmp_path / "signing.pem.pub"
    assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")


def test_encrypt_decrypt_round_trip_with_key_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "k"
    assert run("model", "keygen", "--out", str(key_file)) == 0
    enc, dec = tmp_path / "m.enc", tmp_path / "m.dec"
    assert run("model", "encrypt", str(BUNDLED), "--out", str(enc), "--key-file", str(key_file),
               "--chunk-size", "4096") == 0
    assert artifact.is_encrypted(enc.read_bytes())
    monkeypatch.setenv("MAAS_TEST_KEY", key_file.read_text().strip())
    assert run("model", "decrypt", str(enc), "--out", str(dec), "--key-env", "MAAS_TEST_KEY") == 0
    assert dec.read_bytes() == BUNDLED.read_bytes()
    assert mode(dec) == 0o600  # plaintext weights are owner-only
    assert not list(tmp_path.glob(".*tmp*"))


def test_failed_decrypt_leaves_no_partial_plaintext(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key_file = tmp_path / "k"
    run("model", "keygen", "--out", str(key_file))
    enc = tmp_path / "m.enc"
    run("model", "encrypt", str(BUNDLED), "--out", str(enc), "--key-file", str(key_file), "--chunk-size", "4096")
    data = bytearray(enc.read_bytes())
    data[-3] ^= 1  # the final chunk: earlier chunks would already have been written
    enc.write_bytes(data)
    out = tmp_path / "m.dec"
    assert run("model", "decrypt", str(enc), "--out", str(out), "--key-file", str(key_file)) == 1
    assert "chunk 4 failed authentication" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("argv,message", [
    (["model", "encrypt", "/no/such/file", "--out", "x", "--key-env", "K"], "file not found"),
    (["model", "encrypt", "IN", "--out", "x"], "one of the arguments --key-file --key-env is required"),
    (["model", "encrypt", "IN", "--out", "x", "--key-env", "MAAS_TEST_UNSET_VAR"], "MAAS_TEST_UNSET_VAR is not set"),
    (["model", "encrypt", "IN", "--out", "IN", "--key-file", "KEY"], "--out must differ"),
    (["model", "encrypt", "IN", "--out", "x", "--key-file", "KEY", "--chunk-size", "7"], "--chunk-size must be"),
    (["model", "decrypt", "IN", "--out", "x", "--key-file", "KEY"], "bad magic"),
    (["model", "sign", "IN", "--key", "/no/key.pem"], "not found"),
])
def test_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                               argv: list[str], message: str) -> None:
    monkeypatch.delenv("MAAS_TEST_UNSET_VAR", raising=False)
    (tmp_path / "IN").write_bytes(b"plain")
    (tmp_path / "KEY").write_text(artifact.encode_key(artifact.new_key()))
    monkeypatch.chdir(tmp_path)
    assert run(*argv) != 0
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_sign_and_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "digits.safetensors"
    target.write_bytes(BUNDLED.read_bytes())
    run("model", "keygen", "--signing", "--out", str(tmp_path / "s.pem"))
    assert run("model", "sign", str(target), "--key", str(tmp_path / "s.pem")) == 0
    assert (tmp_path / "digits.safetensors.sig").is_file()
    assert run("model", "verify", str(target), "--pub", str(tmp_path / "s.pem.pub")) == 0
    assert "signature valid" in capsys.readouterr().out
    target.write_bytes(BUNDLED.read_bytes() + b"\x00")
    assert run("model", "verify", str(target), "--pub", str(tmp_path / "s.pem.pub")) == 1
    assert "SHA-256 differs" in capsys.readouterr().err


def test_verify_with_the_wrong_public_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "m"
    target.write_bytes(b"weights")
    run("model", "keygen", "--signing", "--out", str(tmp_path / "a.pem"))
    run("model", "keygen", "--signing", "--out", str(tmp_path / "b.pem"))
    run("model", "sign", str(target), "--key", str(tmp_path / "a.pem"))
    assert run("model", "verify", str(target), "--pub", str(tmp_path / "b.pem.pub")) == 1
    assert "signed by another key" in capsys.readouterr().err


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_draws_on_a_terminal_only() -> None:
    tty, pipe = FakeTty(), io.StringIO()
    for stream in (tty, pipe):
        bar = ProgressBar("encrypt", 100, stream, min_bytes=0)
        for _ in range(10):
            bar(10)
        bar.finish()
    assert "100%" in tty.getvalue() and "encrypt" in tty.getvalue()
    assert pipe.getvalue() == ""


def test_progress_bar_stays_quiet_for_small_files() -> None:
    tty = FakeTty()
    bar = ProgressBar("sign", 1000, tty)
    bar(1000)
    bar.finish()
    assert tty.getvalue() == ""


def test_commands_stay_quiet_on_stdout_when_piped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key_file = tmp_path / "k"
    run("model", "keygen", "--out", str(key_file))
    big = tmp_path / "big"
    big.write_bytes(os.urandom(9 << 20))  # above the progress threshold
    assert run("model", "encrypt", str(big), "--out", str(tmp_path / "big.enc"), "--key-file", str(key_file)) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "\r" not in captured.err  # no bar when stderr is not a terminal
