"""Every line's seq and mac: continuous numbering across restarts, and rewrites found with the key."""

from __future__ import annotations

import hashlib
from pathlib import Path

import orjson
import pytest

from tests.audit_support import entries, new_key_file, rechain, verify_cli, write_lines
from gateway.audit import GENESIS, AuditLog, KeyProblem, decode_key, verify, verify_log
from gateway.audit.chain import Sealer, split_mac


async def test_seq_is_the_line_number_and_continues_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    await write_lines(path, 3)
    await write_lines(path, 2, start=3)
    await write_lines(path, 1, start=5)
    assert [e["seq"] for e in entries(path)] == [1, 2, 3, 4, 5, 6]
    assert verify(path) == (6, None, "ok")


async def test_a_log_from_before_seq_is_continued_by_count(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    prev, lines = GENESIS, []
    for i in range(4):  # what the previous version wrote: no seq
        line = orjson.dumps({"request_id": f"old{i}", "prev": prev})
        prev = hashlib.sha256(line).hexdigest()
        lines.append(line)
    path.write_bytes(b"\n".join(lines) + b"\n")
    await write_lines(path, 2)
    assert [e.get("seq") for e in entries(path)] == [None, None, None, None, 5, 6]
    assert verify(path) == (6, None, "ok")


async def test_seq_out_of_place_is_named(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    await write_lines(path, 4)
    forged = entries(path)
    del forged[1]  # drop line 2 and recompute every prev, but not seq
    prev = GENESIS
    out = []
    for e in forged:
        e["prev"] = prev
        line = orjson.dumps(e)
        prev = hashlib.sha256(line).hexdigest()
        out.append(line)
    path.write_bytes(b"\n".join(out) + b"\n")
    count, bad, reason = verify(path)
    assert bad == 2 and "seq" in reason


async def test_mac_is_the_hmac_of_the_line_without_it(tmp_path: Path) -> None:
    key, _ = new_key_file(tmp_path)
    path = tmp_path / "audit.log"
    await write_lines(path, 2, key=key)
    for raw in path.read_bytes().splitlines():
        entry = orjson.loads(raw)
        assert list(entry)[-3:] == ["seq", "prev", "mac"]  # mac is appended as the last member
        unsigned = orjson.dumps({k: v for k, v in entry.items() if k != "mac"})
        assert split_mac(raw) == (unsigned, entry["mac"])
        assert Sealer(key).check(raw) is None
    assert verify_log(path, key=key).ok


async def test_rewrite_with_recomputed_prev_is_found_only_with_the_key(tmp_path: Path) -> None:
    key, key_file = new_key_file(tmp_path)
    path = tmp_path / "audit.log"
    await write_lines(path, 5, key=key)
    forged = entries(path)
    forged[2]["decision"], forged[2]["status"] = "deny", 403  # line 3 rewritten, the chain recomputed after it
    path.write_bytes(rechain(forged))

    without_key = verify_cli(path)
    assert without_key.returncode == 0, without_key.stdout  # the chain alone cannot see it: that is the point
    with_key = verify_cli(path, "--key-file", str(key_file))
    assert with_key.returncode == 1
    assert with_key.stdout.startswith(f"{path}:3: chain broken: mac does not match")
    assert "Traceback" not in with_key.stderr


async def test_whole_file_rewritten_without_the_key_is_found_at_line_1(tmp_path: Path) -> None:
    key, key_file = new_key_file(tmp_path)
    path = tmp_path / "audit.log"
    await write_lines(path, 3, key=key)
    other = tmp_path / "forged.log"
    await write_lines(other, 3)  # a perfectly chained log, but written without the key
    path.write_bytes(other.read_bytes())
    r = verify_cli(path, "--key-file", str(key_file))
    assert r.returncode == 1 and f"{path}:1: chain broken: no mac" in r.stdout


async def test_a_wrong_key_fails_and_a_good_one_passes(tmp_path: Path) -> None:
    key, key_file = new_key_file(tmp_path)
    path = tmp_path / "audit.log"
    await write_lines(path, 3, key=key)
    ok = verify_cli(path, "--key-file", str(key_file))
    assert ok.returncode == 0 and "every mac valid" in ok.stdout, ok.stdout + ok.stderr
    (tmp_path / "other").mkdir()
    _, other_key = new_key_file(tmp_path / "other")
    bad = verify_cli(path, "--key-file", str(other_key))
    assert bad.returncode == 1 and ":1: chain broken: mac does not match" in bad.stdout


def test_key_format(tmp_path: Path) -> None:
    assert len(decode_key("A" * 43, where="k")) == 32
    with pytest.raises(KeyProblem, match="at least 32"):
        decode_key("c2hvcnQ", where="k")  # "short"
    with pytest.raises(KeyProblem, match="not base64url"):
        decode_key("!!!", where="k")


def test_verify_cli_one_line_errors(tmp_path: Path) -> None:
    missing = verify_cli(tmp_path / "nope.log")
    assert missing.returncode == 1 and missing.stderr.strip().count("\n") == 0 and "file not found" in missing.stderr
    path = tmp_path / "audit.log"
    path.write_bytes(b"")
    no_key = verify_cli(path, "--key-file", str(tmp_path / "nokey"))
    assert no_key.returncode == 1 and "not found" in no_key.stderr and "Traceback" not in no_key.stderr


async def test_gateway_config_key_env_seals_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.config import AuditConfig

    key, key_file = new_key_file(tmp_path)
    monkeypatch.setenv("MAAS_TEST_AUDIT_KEY", key_file.read_text())
    log = AuditLog.from_config(AuditConfig(file=tmp_path / "audit.log", key_env="MAAS_TEST_AUDIT_KEY"))
    await log.start()
    log.write({"request_id": "x"})
    await log.close()
    assert verify_log(tmp_path / "audit.log", key=key).ok
    monkeypatch.delenv("MAAS_TEST_AUDIT_KEY")
    from gateway.errors import ConfigError

    with pytest.raises(ConfigError, match="MAAS_TEST_AUDIT_KEY is not set"):
        AuditLog.from_config(AuditConfig(file=tmp_path / "audit2.log", key_env="MAAS_TEST_AUDIT_KEY"))
