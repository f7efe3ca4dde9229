"""`maas-gateway serve` as a process: graceful drain on SIGTERM, exit 0, workers sharing one port."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.harness import ALLOW_ANALYSTS, Keys, eventually, free_port, gateway_config, start_upstream, v2_model, write_yaml, wait_ready

V2_BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}]}




def spawn(config: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gateway", "serve", "-c", str(config), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


async def test_sigterm_drains_in_flight_requests_and_exits_0(tmp_path: Path, keys: Keys) -> None:
    arrived = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        arrived.set()
        await asyncio.sleep(1.0)  # real time: a request in flight in another process when SIGTERM comes
        return web.json_response({"outputs": []})

    up = await start_upstream(slow)
    port, admin = free_port(), free_port()
    config = gateway_config(tmp_path, keys, models={"digits": v2_model(up.url)}, policy=ALLOW_ANALYSTS,
                            server={"port": port}, admin={"port": admin})
    path = write_yaml(tmp_path / "gateway.yaml", config)
    proc = spawn(path)
    try:
        await wait_ready(f"http://127.0.0.1:{admin}/readyz")
        async with aiohttp.ClientSession() as s:
            pending = asyncio.create_task(s.post(f"http://127.0.0.1:{port}/v2/models/digits/infer", json=V2_BODY,
                                                 headers=keys.auth()))
            await eventually(arrived.is_set)  # the request is in flight at the upstream
            proc.send_signal(signal.SIGTERM)
            r = await pending
            assert r.status == 200  # finished, not cut
        code = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 20)
        assert code == 0, proc.stdout.read() if proc.stdout else ""
        # audit flushed on the way out
        assert (tmp_path / "audit.log").read_text().count("\n") >= 1
    finally:
        if proc.poll() is None:
            proc.kill()
        await up.stop()


async def test_idle_keep_alive_connections_do_not_hold_up_a_graceful_stop(tmp_path: Path, keys: Keys) -> None:
    """Each connection keeps the task that answered it, waiting for its next request: SIGTERM closes such idle
    connections at once (nothing is under way on them) instead of waiting out the drain timeout."""
    up = await start_upstream()
    port, admin = free_port(), free_port()
    config = gateway_config(tmp_path, keys, models={"digits": v2_model(up.url)}, policy=ALLOW_ANALYSTS,
                            server={"port": port, "shutdown_timeout_s": 30, "keepalive_timeout_s": 60},
                            admin={"port": admin})
    path = write_yaml(tmp_path / "gateway.yaml", config)
    proc = spawn(path)
    try:
        await wait_ready(f"http://127.0.0.1:{admin}/readyz")
        connector = aiohttp.TCPConnector(limit=4, force_close=False)
        async with aiohttp.ClientSession(connector=connector) as s:
            async def one() -> int:
                async with s.post(f"http://127.0.0.1:{port}/v2/models/digits/infer", json=V2_BODY,
                                  headers=keys.auth()) as r:
                    await r.read()
                    return r.status
            assert await asyncio.gather(*(one() for _ in range(4))) == [200] * 4  # 4 kept-alive, now idle
            loop = asyncio.get_running_loop()
            started = loop.time()
            proc.send_signal(signal.SIGTERM)
            code = await loop.run_in_executor(None, proc.wait, 20)
            assert code == 0, proc.stdout.read() if proc.stdout else ""
            assert loop.time() - started < 10  # not the 30 s drain timeout
    finally:
        if proc.poll() is None:
            proc.kill()
        await up.stop()


@pytest.mark.slow
async def test_workers_share_one_port(tmp_path: Path, keys: Keys) -> None:
    up = await start_upstream()
    port, admin = free_port(), free_port()
    config = gateway_config(tmp_path, keys, models={"digits": v2_model(up.url)}, policy=ALLOW_ANALYSTS,
                            server={"port": port}, admin={"port": admin})
    path = write_yaml(tmp_path / "gateway.yaml", config)
    proc = spawn(path, "--workers", "2")
    try:
        await wait_ready(f"http://127.0.0.1:{admin}/readyz")
        async with aiohttp.ClientSession() as s:
            statuses = []
            for _ in range(20):
                async with s.post(f"http://127.0.0.1:{port}/v2/models/digits/infer", json=V2_BODY,
                                  headers={**keys.auth(), "Connection": "close"}) as r:
                    statuses.append(r.status)
        assert statuses == [200] * 20
        # whichever worker answers the scrape, it reports every worker's requests (each flushes once a second)
        counted = 0.0
        async with aiohttp.ClientSession() as s:
            for _ in range(30):
                text = await (await s.get(f"http://127.0.0.1:{admin}/metrics")).text()
                line = next(l for l in text.splitlines() if l.startswith("maas_requests_total{") and 'status="200"' in l)
                counted = float(line.rsplit(" ", 1)[1])
                if counted >= 20:
                    break
                await asyncio.sleep(0.1)  # the poll interval of this wait on a condition, not a clock
        assert counted == 20.0
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) >= 2
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 30)
        assert code == 0
    finally:
        if proc.poll() is None:
            for child in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split():
                os.kill(int(child), signal.SIGKILL)
            proc.kill()
        await up.stop()


def test_check_reports_findings_and_exit_codes(tmp_path: Path, keys: Keys) -> None:
    config = gateway_config(tmp_path, keys, models={"digits": v2_model("http://127.0.0.1:9")}, policy=ALLOW_ANALYSTS)
    path = write_yaml(tmp_path / "gateway.yaml", config)
    ok = subprocess.run([sys.executable, "-m", "gateway", "check", "-c", str(path)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    config["server"]["host"] = "0.0.0.0"
    config["policy"] = {"file": str(write_yaml(tmp_path / "open.yaml", {"rules": [
        {"id": "open-door", "roles": ["*"], "models": ["*"], "actions": ["*"], "effect": "allow"}]}))}
    write_yaml(path, config)
    bad = subprocess.run([sys.executable, "-m", "gateway", "check", "-c", str(path)], capture_output=True, text=True)
    assert bad.returncode == 1
    assert "plain HTTP on non-loopback" in bad.stdout
    assert "open-door" in bad.stdout
    broken = tmp_path / "broken.yaml"
    broken.write_text("server: {port: nope}\n")
    err = subprocess.run([sys.executable, "-m", "gateway", "check", "-c", str(broken)], capture_output=True, text=True)
    assert err.returncode == 1 and "broken.yaml:1: server.port" in err.stderr and "Traceback" not in err.stderr
