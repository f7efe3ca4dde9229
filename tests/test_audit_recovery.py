"""A line torn by a crash: cut on the next start (its bytes kept aside), recorded in a recovery line, verify goes on."""

from __future__ import annotations

import hashlib
from pathlib import Path

import aiohttp

from tests import harness
from tests.audit_support import entries, new_key_file, verify_cli, write_lines
from gateway.audit import verify_log
from tests.harness import ALLOW_ANALYSTS, Keys, start_gateway, v2_model

TORN = b'{"ts":"2026-11-22T03:26:39.123Z","request_id":"crashed-mid-wr'
V2_BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}]}


async def test_torn_tail_is_cut_recorded_and_verify_goes_on(tmp_path: Path) -> None:
    key, key_file = new_key_file(tmp_path)
    path = tmp_path / "audit.log"
    await write_lines(path, 3, key=key)
    whole = path.read_bytes()
    path.write_bytes(whole + TORN)  # the crash
    broken = verify_cli(path)
    assert broken.returncode == 1 and f"{path}:4: chain broken: incomplete last line" in broken.stdout

    await write_lines(path, 2, key=key, start=3)  # the restart
    lines = entries(path)
    assert [e["seq"] for e in lines] == [1, 2, 3, 4, 5, 6]
    recovery = lines[3]
    assert recovery["event"] == "recovery" and recovery["after_seq"] == 3
    assert recovery["cut_bytes"] == len(TORN) and recovery["cut_sha256"] == hashlib.sha256(TORN).hexdigest()
    assert recovery["prev"] == hashlib.sha256(whole.splitlines()[-1]).hexdigest()  # chains from the last whole line
    assert (tmp_path / recovery["saved_to"]).read_bytes() == TORN  # the evidence is kept, beside the log
    assert path.read_bytes().startswith(whole) and TORN not in path.read_bytes()

    r = verify_cli(path, "--key-file", str(key_file))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{path}:4: recovery: {len(TORN)} byte(s) of a torn line cut after line 3" in r.stdout
    assert r.stdout.strip().endswith("6 line(s), chain intact, every mac valid")


async def test_a_file_that_is_only_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    path.write_bytes(TORN)
    await write_lines(path, 1)
    lines = entries(path)
    assert lines[0]["event"] == "recovery" and lines[0]["seq"] == 1 and lines[0]["after_seq"] == 0
    report = verify_log(path)
    assert report.ok and [n for n, _ in report.recoveries] == [1]


async def test_torn_tail_then_gateway_restart(tmp_path: Path, keys: Keys) -> None:
    async with harness.upstream() as up:
        for round_ in range(2):
            gw = await start_gateway(tmp_path, keys, models={"digits": v2_model(up.url)}, policy=ALLOW_ANALYSTS)
            async with aiohttp.ClientSession() as s:
                r = await s.post(gw.url + "/v2/models/digits/infer", json=V2_BODY, headers=keys.auth())
                assert r.status == 200
            await gw.stop()
            if round_ == 0:
                with (tmp_path / "audit.log").open("ab") as f:
                    f.write(TORN)
    r = verify_cli(tmp_path / "audit.log")
    assert r.returncode == 0, r.stdout
    assert ":2: recovery:" in r.stdout and "3 line(s), chain intact" in r.stdout
