"""audit.required: lines that cannot be written fail /readyz and answer 503 until writing works again; nothing lost.

Also: ``maas_audit_lines_total`` counts only lines in the file, and a successful ``GET /v1/models`` is an allow.
"""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import gateway.audit.writer as writer
from tests import harness
from tests.audit_support import entries
from gateway.audit import AuditLog, verify
from gateway.metrics import Metrics
from tests.harness import ALLOW_ANALYSTS, Keys, eventually, start_gateway, v2_model
from tests.harness import error_fields

V2_BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}]}


class Disk:
    """Stands in for ``os.write`` on the audit file: full when ``full`` is set, else the real write."""

    def __init__(self) -> None:
        self.full = False
        self.partial: int | None = None  # write this many bytes once, then fail

    def __call__(self, fd: int, data: Any) -> int:
        if self.partial is not None:
            n, self.partial = self.partial, None
            self.full = True
            return os.write(fd, bytes(data[:n]))
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(fd, data)


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Disk:
    fake = Disk()
    monkeypatch.setattr(writer, "_write", fake)
    return fake


def lines_total(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("maas_audit_lines_total") or 0.0


async def wait_for(predicate: Any, timeout: float = 3.0) -> None:
    await eventually(predicate, timeout, interval=0.05, message="condition never held")


async def test_dev_full_fails_readiness_and_answers_503(tmp_path: Path, keys: Keys) -> None:
    async with (harness.upstream() as up,
                harness.gateway(tmp_path, keys, models={"digits": v2_model(up.url)}, policy=ALLOW_ANALYSTS,
                                audit={"file": "/dev/full"}) as gw):
        async with aiohttp.ClientSession() as s:
            first = await s.post(gw.url + "/v2/models/digits/infer", json=V2_BODY, headers=keys.auth())
            assert first.status == 200  # nothing has failed yet: the line waits for the next flush

            async def unready() -> bool:
                return (await s.get(gw.admin_url + "/readyz")).status == 503
            await wait_for(unready)
            body = await (await s.get(gw.admin_url + "/readyz")).json()
            assert any("audit log /dev/full not writable" in r for r in body["reasons"]), body

            r = await s.post(gw.url + "/v2/models/digits/infer", json=V2_BODY, headers=keys.auth())
            assert r.status == 503
            assert error_fields(await r.json()) == {"type": "unavailable", "message": "audit log not writable",
                                                 "request_id": r.headers["X-Request-ID"]}
            assert len(up.seen) == 1  # the refused request never reached the upstream
        metrics = gw.gateway.metrics
        assert lines_total(metrics) == 0
        assert metrics.registry.get_sample_value("maas_audit_errors_total") >= 1


async def test_full_disk_then_space_again_loses_nothing(tmp_path: Path, keys: Keys, disk: Disk) -> None:
    async with harness.upstream() as up:
        gw = await start_gateway(tmp_path, keys, models={"digits": v2_model(up.url)}, policy=ALLOW_ANALYSTS)
        async with aiohttp.ClientSession() as s:
            async def ready(expect: int) -> bool:
                return (await s.get(gw.admin_url + "/readyz")).status == expect

            assert (await s.post(gw.url + "/v2/models/digits/infer", json=V2_BODY, headers=keys.auth())).status == 200
            await wait_for(lambda: ready(200))
            disk.full = True
            assert (await s.post(gw.url + "/v2/models/digits/infer", json=V2_BODY, headers=keys.auth())).status == 200
            await wait_for(lambda: ready(503))
            refused = await s.post(gw.url + "/v2/models/digits/infer", json=V2_BODY, headers=keys.auth())
            assert refused.status == 503
            disk.full = False
            await wait_for(lambda: ready(200))
            assert (await s.post(gw.url + "/v2/models/digits/infer", json=V2_BODY, headers=keys.auth())).status == 200
        await gw.stop()
        lines = entries(tmp_path / "audit.log")
        assert [e["status"] for e in lines] == [200, 200, 503, 200]  # the ones held in memory were written, once
        assert verify(tmp_path / "audit.log") == (4, None, "ok")
        assert lines_total(gw.gateway.metrics) == 4


async def test_not_required_keeps_serving_and_counts(tmp_path: Path, keys: Keys, disk: Disk) -> None:
    async with harness.upstream() as up:
        gw = await start_gateway(tmp_path, keys, models={"digits": v2_model(up.url)}, policy=ALLOW_ANALYSTS,
                                 audit={"required": False})
        disk.full = True
        async with aiohttp.ClientSession() as s:
            for _ in range(3):
                assert (await s.post(gw.url + "/v2/models/digits/infer", json=V2_BODY,
                                     headers=keys.auth())).status == 200
                await asyncio.sleep(0.25)  # a real gateway's audit flush timer: serving on across several failed flushes
            assert (await s.get(gw.admin_url + "/readyz")).status == 200
        metrics = gw.gateway.metrics
        assert metrics.registry.get_sample_value("maas_audit_errors_total") >= 1
        assert lines_total(metrics) == 0
        disk.full = False
        await gw.stop()
        assert lines_total(metrics) == 3 and verify(tmp_path / "audit.log") == (3, None, "ok")


async def test_a_line_split_by_a_failure_is_completed_not_repeated(tmp_path: Path, disk: Disk) -> None:
    metrics = Metrics()
    path = tmp_path / "audit.log"
    log = AuditLog(path, metrics)
    for i in range(3):
        log.write({"request_id": f"r{i}"})
    disk.partial = 130  # line 1 is 102 bytes: the write stops inside line 2
    assert log.flush() is False
    assert lines_total(metrics) == 1 and log.refusing and log.not_ready()
    assert len(path.read_bytes()) == 130
    disk.full = False
    assert log.flush() is True
    assert not log.refusing and log.not_ready() is None
    assert lines_total(metrics) == 3 and verify(path) == (3, None, "ok")
    await log.close()


async def test_memory_is_bounded_and_drops_keep_the_chain_whole(tmp_path: Path, disk: Disk) -> None:
    metrics = Metrics()
    path = tmp_path / "audit.log"
    log = AuditLog(path, metrics, max_pending_bytes=65_536)
    disk.full = True
    log.write({"request_id": "first"})
    log.flush()
    for i in range(2000):  # ~100 KB of lines while the disk is full
        log.write({"request_id": f"r{i:05d}", "padding": "x" * 20})
    dropped = metrics.registry.get_sample_value("maas_audit_dropped_lines_total")
    assert dropped and dropped > 0
    disk.full = False
    await log.close()
    count, bad, _ = verify(path)
    assert bad is None and count == 2001 - dropped and lines_total(metrics) == count


async def test_models_list_is_audited_as_an_allow(tmp_path: Path, keys: Keys) -> None:
    async with (harness.upstream() as up,
                harness.gateway(tmp_path, keys, models={"digits": v2_model(up.url)}, policy=ALLOW_ANALYSTS) as gw):
        async with aiohttp.ClientSession() as s:
            r = await s.get(gw.url + "/v1/models", headers=keys.auth("alice"))
            assert r.status == 200
        gw.gateway.audit.flush()
        line = entries(tmp_path / "audit.log")[-1]
        assert (line["status"], line["decision"], line["subject"], line["action"]) == (200, "allow", "alice", "read")
