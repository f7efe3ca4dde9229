"""`serve --workers N` keeps N workers: a dead one is replaced (with a back-off), SIGTERM still exits 0.

Real processes throughout: the gateway runs as ``python -m gateway serve`` and
workers are killed with real signals; worker pids come from /proc (children of
the parent that run multiprocessing's spawn entry point).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import pytest

from tests import harness
from tests.harness import ALLOW_ANALYSTS, Keys, eventually, free_port, gateway_config, start_upstream, v2_model, wait_ready, write_yaml

V2_BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}]}
DEATH = re.compile(r"worker (\d+) \(pid (\d+)\) (.+) after [\d.]+ s; replacing it in ([\d.]+) s")
REPLACED = re.compile(r"worker (\d+) replaced: now pid (\d+)")
STARTED = re.compile(r"started \d+ workers \(pids ([\d ]+)\)")


class Log:
    """The parent's output (its own lines and its workers'), read by a thread, each line with its arrival time."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with self._cond:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self._cond.notify_all()

    def text(self) -> str:
        with self._cond:
            return "\n".join(line for _, line in self.lines)

    def matches(self, pattern: re.Pattern[str]) -> list[tuple[float, re.Match[str]]]:
        with self._cond:
            return [(t, m) for t, line in self.lines if (m := pattern.search(line))]

    async def wait_for(self, pattern: re.Pattern[str], count: int = 1, timeout: float = 20) -> list[tuple[float, re.Match[str]]]:
        def enough() -> list[tuple[float, re.Match[str]]] | None:
            found = self.matches(pattern)
            return found if len(found) >= count else None

        result: list[tuple[float, re.Match[str]]] = await eventually(
            enough, timeout, interval=0.05, message=lambda: f"no {count}x {pattern.pattern!r}; output:\n{self.text()}")
        return result


def worker_pids(parent: int) -> set[int]:
    """Live children of ``parent`` that are multiprocessing spawn workers (not its resource tracker)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()  # after "(comm)": state, ppid, ...
        if int(fields[1]) == parent and fields[0] != "Z" and b"--multiprocessing-fork" in cmdline:
            found.add(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class Gateway:
    proc: subprocess.Popen[str]
    log: Log
    port: int
    admin: int
    config_path: Path
    config: dict
    audit_file: Path
    initial: list[int] = field(default_factory=list)  # worker pids by slot index

    async def stop(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.get_running_loop().run_in_executor(None, self.proc.wait, timeout)

    def kill_all(self) -> None:
        if self.proc.poll() is None:
            for pid in worker_pids(self.proc.pid):
                os.kill(pid, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait(10)


async def start(tmp_path: Path, keys: Keys, upstream_url: str, workers: int = 2) -> Gateway:
    port, admin = free_port(), free_port()
    config = gateway_config(tmp_path, keys, models={"digits": v2_model(upstream_url)}, policy=ALLOW_ANALYSTS,
                            server={"port": port, "shutdown_timeout_s": 2}, admin={"port": admin})
    path = write_yaml(tmp_path / "gateway.yaml", config)
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "-c", str(path), "--workers", str(workers)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    gw = Gateway(proc, Log(proc), port, admin, path, config, Path(config["audit"]["file"]))
    try:
        [(_, started)] = await gw.log.wait_for(STARTED, timeout=30)
        gw.initial = [int(p) for p in started.group(1).split()]
        await wait_ready(f"http://127.0.0.1:{admin}/readyz")
        # readyz answers when one worker is up: wait for every worker's listener
        await gw.log.wait_for(re.compile(r"maas-gateway listening"), count=workers, timeout=30)
    except BaseException:
        gw.kill_all()
        raise
    return gw


@contextlib.asynccontextmanager
async def workers_over_upstream(tmp_path: Path, keys: Keys) -> AsyncIterator[Gateway]:
    """A two-worker gateway in front of a fresh upstream; at exit every process is killed and the upstream stopped."""
    async with harness.upstream() as up:
        gw = await start(tmp_path, keys, up.url)
        try:
            yield gw
        finally:
            gw.kill_all()


@dataclass
class Outcome:
    started: float
    ok: bool
    what: str


async def traffic(port: int, keys: Keys, stop: asyncio.Event, outcomes: list[Outcome], users: int = 4) -> None:
    """``users`` callers sending requests back to back, each on a new connection (spread over the workers)."""
    auth = keys.auth()

    async def user() -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                         timeout=aiohttp.ClientTimeout(total=10)) as s:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    async with s.post(f"http://127.0.0.1:{port}/v2/models/digits/infer", json=V2_BODY,
                                      headers=auth) as r:
                        await r.read()
                        outcomes.append(Outcome(t0, r.status == 200, str(r.status)))
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                    outcomes.append(Outcome(t0, False, type(exc).__name__))
                    await asyncio.sleep(0.01)  # the load generator's pause after a refused request, not a clock

    await asyncio.gather(*(user() for _ in range(users)))


def audit_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.mark.slow
async def test_killed_worker_is_replaced_while_requests_keep_succeeding(tmp_path: Path, keys: Keys) -> None:
    up = await start_upstream()
    gw = await start(tmp_path, keys, up.url)
    stop, outcomes = asyncio.Event(), []
    load = asyncio.create_task(traffic(gw.port, keys, stop, outcomes))
    try:
        assert worker_pids(gw.proc.pid) == set(gw.initial)
        await eventually(lambda: sum(o.ok for o in outcomes) >= 20, timeout=10)  # the load is flowing
        victim = gw.initial[1]
        slot_file = gw.audit_file.with_name(gw.audit_file.name + ".w1")
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()

        [(seen_at, death)] = await gw.log.wait_for(DEATH, timeout=10)
        assert (death.group(1), int(death.group(2)), death.group(3)) == ("1", victim, "was killed by SIGKILL")
        [(replaced_at, replaced)] = await gw.log.wait_for(REPLACED, timeout=10)
        new_pid = int(replaced.group(2))
        assert replaced.group(1) == "1" and replaced_at - killed_at < 5  # within a few seconds
        assert not alive(victim)
        assert worker_pids(gw.proc.pid) == {gw.initial[0], new_pid}
        await gw.log.wait_for(re.compile(r"w1 INFO maas.server: maas-gateway listening"), count=2)
        listening_at = time.monotonic()

        # the replacement serves, and continues its slot's audit file
        before = audit_lines(slot_file)
        await eventually(lambda: audit_lines(slot_file) > before, timeout=15, interval=0.2,
                         message="the replacement answered nothing")
        await eventually(lambda: len([o for o in outcomes if o.started > listening_at]) > 20, timeout=10)
        stop.set()
        await load

        after_kill = [o for o in outcomes if o.started >= killed_at]
        failed = [o for o in outcomes if not o.ok]
        # only requests already on their way to the killed worker may fail (about one per caller)...
        assert len(failed) <= 8, [(o.started - killed_at, o.what) for o in failed]
        assert all(o.what != "500" and o.what != "503" for o in failed)
        # ...and every request sent once the worker was gone succeeded, before and after the replacement
        assert [o for o in outcomes if o.started > killed_at + 0.5 and not o.ok] == []
        assert len([o for o in after_kill if o.started > listening_at]) > 20

        workers = {gw.initial[0], new_pid}
        code = await gw.stop()
        assert code == 0, gw.log.text()
        assert not any(alive(pid) for pid in workers)
        assert "during shutdown" not in gw.log.text()
    finally:
        stop.set()
        await asyncio.gather(load, return_exceptions=True)
        gw.kill_all()
        await up.stop()


@pytest.mark.slow
async def test_worker_that_exits_0_unasked_is_replaced_and_sighup_still_relayed(tmp_path: Path, keys: Keys) -> None:
    """A worker stopped on its own (SIGTERM to its pid, not the parent's) drains, exits 0, and is replaced."""
    async with workers_over_upstream(tmp_path, keys) as gw:
        os.kill(gw.initial[0], signal.SIGTERM)
        [(_, death)] = await gw.log.wait_for(DEATH, timeout=15)
        assert death.group(1) == "0" and death.group(3) == "exited with code 0"
        [(_, replaced)] = await gw.log.wait_for(REPLACED, timeout=10)
        new_pid = int(replaced.group(2))
        await gw.log.wait_for(re.compile(r"w0 INFO maas.server: maas-gateway listening"), count=2)
        gw.proc.send_signal(signal.SIGHUP)  # reaches both workers, and kills neither
        await gw.log.wait_for(re.compile(r"policy reloaded from"), count=2, timeout=10)
        await asyncio.sleep(0.5)  # a window for a worker death that must not come (nothing to wait on)
        assert worker_pids(gw.proc.pid) == {gw.initial[1], new_pid}
        assert len(gw.log.matches(DEATH)) == 1
        assert await gw.stop() == 0


@pytest.mark.slow
async def test_crash_loop_is_throttled_by_the_back_off(tmp_path: Path, keys: Keys) -> None:
    """The config breaks after start; a killed worker's replacements die at start at a doubling interval."""
    async with workers_over_upstream(tmp_path, keys) as gw:
        gw.config_path.write_text("server: {port: nope}\n")  # every new worker now fails to load it
        os.kill(gw.initial[0], signal.SIGKILL)
        deaths = await gw.log.wait_for(DEATH, count=4, timeout=60)
        assert all(m.group(1) == "0" for _, m in deaths)
        assert [float(m.group(4)) for _, m in deaths] == [0.5, 1.0, 2.0, 4.0]  # doubling per slot
        # without a back-off a start that fails in under a second would die several times a second;
        # here each failed start comes no sooner than its slot's back-off allows
        times = [t for t, _ in deaths]
        for i in range(1, len(times)):
            assert times[i] - times[i - 1] >= [0.5, 1.0, 2.0][i - 1] - 0.05
        assert len(gw.log.matches(REPLACED)) == 3
        text = gw.log.text()
        assert "w0 ERROR maas.workers: worker 0 cannot run:" in text and "server.port" in text
        assert "Traceback" not in text  # one line per failed start

        # the other worker kept serving all along
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{gw.port}/v2/models/digits/infer", json=V2_BODY,
                              headers=keys.auth()) as r:
                assert r.status == 200

        # SIGTERM while slot 0 waits out its 4 s back-off: nothing more is started, exit 0
        assert await gw.stop() == 0, gw.log.text()
        assert len(gw.log.matches(REPLACED)) == 3
        assert worker_pids(gw.proc.pid) == set() and not alive(gw.initial[1])


@pytest.mark.slow
async def test_a_worker_that_cannot_start_stops_the_gateway(tmp_path: Path, keys: Keys) -> None:
    """The first start failing (port held by another program) is an error, not an endless crash loop."""
    up = await start_upstream()
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))  # no SO_REUSEPORT: the workers cannot join it
    holder.listen()
    port, admin = holder.getsockname()[1], free_port()
    config = gateway_config(tmp_path, keys, models={"digits": v2_model(up.url)}, policy=ALLOW_ANALYSTS,
                            server={"port": port}, admin={"port": admin})
    path = write_yaml(tmp_path / "gateway.yaml", config)
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "-c", str(path), "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = await asyncio.get_running_loop().run_in_executor(None, lambda: proc.communicate(timeout=60))
        assert proc.returncode == 1, out
        assert "before it was ready: the gateway cannot start" in out
        assert "replacing it" not in out
    finally:
        holder.close()
        if proc.poll() is None:
            proc.kill()
        await up.stop()
