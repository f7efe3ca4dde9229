"""The witness: lines cut from the end are found (file or Redis witness), also when cut while the gateway was down."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import orjson
import pytest
import redis

from tests.audit_support import entries, new_key_file, rechain, verify_cli, write_lines
from tests.harness import eventually
from gateway.audit import AuditLog, verify_log
from gateway.audit.witness import locate


def cut_last(path: Path, n: int) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-n]))


@pytest.fixture
def redis_witness(redis_url: str):
    key = f"maas:test:audit-witness:{uuid.uuid4().hex}"
    yield f"{redis_url}#{key}", key
    client = redis.Redis.from_url(redis_url)
    client.delete(key, f"{key}.w0")
    client.close()


async def test_file_witness_finds_lines_cut_from_the_end(tmp_path: Path) -> None:
    path, witness = tmp_path / "audit.log", tmp_path / "other-volume" / "audit.head"
    witness.parent.mkdir()
    await write_lines(path, 6, witness=str(witness))
    record = orjson.loads(witness.read_bytes())
    assert record["seq"] == 6 and record["log"] == "audit.log"

    assert verify_cli(path, "--witness", str(witness)).returncode == 0
    cut_last(path, 2)
    assert verify_cli(path).returncode == 0  # the chain alone cannot tell: every remaining line is fine
    r = verify_cli(path, "--witness", str(witness))
    assert r.returncode == 1
    assert r.stdout.strip() == f"{path}:5: chain broken: lines 5-6 missing from the end (the witness recorded seq 6)"


async def test_redis_witness_finds_lines_cut_from_the_end(tmp_path: Path, redis_witness: tuple[str, str]) -> None:
    url, key = redis_witness
    path = tmp_path / "audit.log"
    await write_lines(path, 4, witness=url)
    ok = verify_cli(path, "--witness", url)
    assert ok.returncode == 0 and "matches the witness (seq 4)" in ok.stdout, ok.stdout + ok.stderr
    cut_last(path, 1)
    r = verify_cli(path, "--witness", url)
    assert r.returncode == 1 and f"{path}:4: chain broken: lines 4-4 missing" in r.stdout


async def test_head_is_recorded_after_each_flush_while_running(tmp_path: Path, redis_witness: tuple[str, str]) -> None:
    url, key = redis_witness
    path = tmp_path / "audit.log"
    log = AuditLog(path, witness=url)
    await log.start()
    try:
        for i in range(3):
            log.write({"request_id": f"r{i}"})
        client = redis.Redis.from_url(url.partition("#")[0])
        try:  # recorded within a few flush ticks
            raw = await eventually(lambda: (r := client.get(key)) and orjson.loads(r)["seq"] == 3 and r, timeout=5)
        finally:
            client.close()
        record = orjson.loads(raw)
        assert record["seq"] == 3
    finally:
        await log.close()


async def test_rewritten_head_line_and_replaced_file_are_found_without_a_key(tmp_path: Path) -> None:
    path, witness = tmp_path / "audit.log", tmp_path / "w"
    witness.mkdir()  # a directory: the record goes to w/audit.log.witness
    await write_lines(path, 4, witness=str(witness))
    assert (witness / "audit.log.witness").is_file()
    forged = entries(path)
    forged[3]["status"] = 500
    path.write_bytes(rechain(forged))
    r = verify_cli(path, "--witness", str(witness))
    assert r.returncode == 1 and f"{path}:4: chain broken: line does not match the witness" in r.stdout

    other = tmp_path / "other.log"
    await write_lines(other, 4)
    path.write_bytes(other.read_bytes())
    r = verify_cli(path, "--witness", str(witness))
    assert r.returncode == 1 and f"{path}:1: chain broken: line 1 is not the one the witness recorded" in r.stdout


async def test_witness_record_carries_a_mac_with_a_key(tmp_path: Path) -> None:
    key, key_file = new_key_file(tmp_path)
    path, witness = tmp_path / "audit.log", tmp_path / "audit.head"
    await write_lines(path, 2, key=key, witness=str(witness))
    assert verify_cli(path, "--key-file", str(key_file), "--witness", str(witness)).returncode == 0
    record = orjson.loads(witness.read_bytes())
    record["seq"] = 1  # an attacker with the witness but not the key lowers the head
    witness.write_bytes(orjson.dumps(record))
    r = verify_cli(path, "--key-file", str(key_file), "--witness", str(witness))
    assert r.returncode == 1 and "witness record: mac does not match" in r.stderr


async def test_lines_cut_while_the_gateway_was_down_are_recorded_on_start(tmp_path: Path) -> None:
    path, witness = tmp_path / "audit.log", tmp_path / "audit.head"
    await write_lines(path, 5, witness=str(witness))
    cut_last(path, 2)
    await write_lines(path, 2, witness=str(witness), start=5)  # restart: the witness now points past the cut
    gap = entries(path)[3]
    assert gap["event"] == "witness_gap" and gap["file_seq"] == 3 and gap["witness_seq"] == 5
    for extra in ((), ("--witness", str(witness))):
        r = verify_cli(path, *extra)
        assert r.returncode == 1
        assert f"{path}:4: chain broken: the gateway found on start that lines 4-5 were cut" in r.stdout


async def test_missing_or_unreachable_witness_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    await write_lines(path, 1)
    r = verify_cli(path, "--witness", str(tmp_path / "none.head"))
    assert r.returncode == 1 and "the witness has no record of this log" in r.stdout
    r = verify_cli(path, "--witness", "redis://:s3cret@127.0.0.1:9/0")
    assert r.returncode == 1 and r.stderr.startswith("error: witness redis://***@127.0.0.1:9/0")
    assert "s3cret" not in r.stderr and "Traceback" not in r.stderr


async def test_a_failing_witness_is_counted_and_the_log_goes_on(tmp_path: Path) -> None:
    from gateway.metrics import Metrics

    metrics = Metrics()
    path = tmp_path / "audit.log"
    log = AuditLog(path, metrics, witness="redis://127.0.0.1:9/0")  # nothing listens on port 9
    await log.start()
    log.write({"request_id": "a"})
    await eventually(lambda: (metrics.registry.get_sample_value("maas_audit_witness_errors_total") or 0) >= 1)
    assert log.not_ready() is None  # a witness failure alone does not fail readiness
    await log.close()
    assert metrics.registry.get_sample_value("maas_audit_witness_errors_total") >= 1
    assert metrics.registry.get_sample_value("maas_audit_lines_total") == 1
    assert verify_log(path).ok


def test_worker_files_get_their_own_witness(tmp_path: Path) -> None:
    assert locate(str(tmp_path / "head"), tmp_path / "audit.log").where == str(tmp_path / "head")
    assert locate(str(tmp_path / "head"), tmp_path / "audit.log.w1").where == str(tmp_path / "head.w1")
    assert locate(str(tmp_path / "head.w1"), tmp_path / "audit.log.w1").where == str(tmp_path / "head.w1")
    assert locate("redis://h:6379/0#k", tmp_path / "audit.log.w0").where == "redis://h:6379/0 key k.w0"
    assert locate("redis://h/0", tmp_path / "a.log.w2").where == "redis://h/0 key maas:audit:witness:a.log.w2"


async def test_a_hung_witness_never_delays_the_lines(tmp_path: Path) -> None:
    connected = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected.set()
        await asyncio.sleep(30)  # the thing under test: a witness that accepts and never answers

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    path = tmp_path / "audit.log"
    log = AuditLog(path, witness=f"redis://127.0.0.1:{port}/0#k")
    try:
        await log.start()
        log.write({"request_id": "a"})
        await eventually(lambda: connected.is_set() and path.exists() and len(path.read_bytes().splitlines()) == 1)
        # the first flush is done and its witness call now hangs
        log.write({"request_id": "b"})
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.sleep(0.35)  # the audit flush timer on the real loop keeps time while the witness hangs
        assert loop.time() - started < 0.5  # the event loop was never held
        assert len(path.read_bytes().splitlines()) == 2  # flushed while the witness hung
    finally:
        await log.close()
        server.close()
