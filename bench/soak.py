#!/usr/bin/env python3
"""A bounded soak: mixed, partly hostile traffic against ``serve --workers 2``, printing what leaks.

Run by hand (never in CI):

    python bench/soak.py --duration 300            # the 5-minute soak issue 11 asks for
    python bench/soak.py --duration 60 --quick     # a shorter look

Traffic, all at once for ``--duration`` seconds:

* JSON v2 infer (small answers), and OpenAI chat streams (SSE, ~2 s each),
* large non-streamed answers (``/v1/embeddings``, 64 x 1536 floats, ~1.3 MB),
* ``--half-open`` connections that send half a request head and go silent (reopened when closed),
* a few stalled readers: a stream is asked for and never read (tiny receive buffer),
* clients that disconnect mid-stream,
* a caller that provokes upstream 500s on purpose (counted apart: they are the only 5xx allowed).

Every ``--sample-s`` it prints, per worker, RSS and open fds, and the upstream's open connections
(the gateway's pooled connections as the upstream sees them). At the end it waits for the pools to
idle out, stops the gateway with SIGTERM, and checks: no 5xx but the provoked ones, RSS growth after
warm-up under 50 MB per worker, fds back to their warm level, no upstream connection left open, and
exactly one audit line per request sent whole, with every worker's chain verifying.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
EMBEDDING = [0.001 * i for i in range(1536)]
WRITE_TIMEOUT_S = 5
V2_BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [0.1, 0.2, 0.3, 0.4]}]}


def free_ports(n: int) -> list[int]:
    """n distinct free ports (all held open while choosing, so none is handed out twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


# ---------------------------------------------------------------- the upstream (its own process)

def upstream_main(port: int) -> None:
    """A model server: v2 infer, chat (JSON or a ~2 s SSE stream), embeddings (large), /fail (500)."""

    async def infer(_: web.Request) -> web.Response:
        return web.json_response({"model_name": "m", "outputs": [
            {"name": "scores", "datatype": "FP32", "shape": [1, 2], "data": [0.25, 0.75]}]})

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return web.json_response({"id": "c", "object": "chat.completion", "model": body["model"],
                                      "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                                   "finish_reason": "stop"}],
                                      "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(20):
            chunk = {"id": "c", "object": "chat.completion.chunk", "model": body["model"],
                     "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}]}
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            await asyncio.sleep(0.1)
        usage = {"id": "c", "object": "chat.completion.chunk", "model": body["model"], "choices": [],
                 "usage": {"prompt_tokens": 3, "completion_tokens": 20, "total_tokens": 23}}
        await resp.write(b"data: " + orjson.dumps(usage) + b"\n\ndata: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def embeddings(request: web.Request) -> web.Response:
        body = await request.json()
        n = len(body.get("input") or [1])
        data = [{"object": "embedding", "index": i, "embedding": EMBEDDING} for i in range(n)]
        return web.Response(body=orjson.dumps({"object": "list", "model": body["model"], "data": data,
                                               "usage": {"prompt_tokens": n, "total_tokens": n}}),
                            content_type="application/json")

    async def fail(_: web.Request) -> web.Response:
        return web.json_response({"error": "provoked"}, status=500)

    async def stats(_: web.Request) -> web.Response:
        return web.json_response({"connections": len(runner.server.connections) - 1})  # minus this one

    app = web.Application(client_max_size=4 << 20)
    app.router.add_post("/v2/models/m/infer", infer)
    app.router.add_post("/v2/models/bad/infer", fail)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/_stats", stats)
    runner = web.AppRunner(app, access_log=None)

    async def run() -> None:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()

    asyncio.run(run())


# ---------------------------------------------------------------- setup

def write_setup(tmp: Path, port: int, admin: int, upstream: str) -> tuple[Path, str]:
    keys = tmp / "api_keys.yaml"
    out = subprocess.run([sys.executable, "-m", "gateway", "keys", "create", "--subject", "soak", "--roles",
                          "tester", "--file", str(keys)], check=True, capture_output=True, text=True, cwd=ROOT)
    key = out.stdout.splitlines()[0].strip()
    (tmp / "policy.yaml").write_text(json.dumps({
        "rules": [{"id": "testers", "roles": ["tester"], "models": ["*"], "actions": ["infer", "read"],
                   "effect": "allow"}],
        "quotas": [{"roles": ["tester"], "models": ["*"], "rate_per_s": 100000, "burst": 100000,
                    "max_concurrent": 1000}],
    }))
    config = {
        "server": {"host": "127.0.0.1", "port": port, "header_timeout_s": 5, "client_write_timeout_s": WRITE_TIMEOUT_S,
                   "keepalive_timeout_s": 15, "upstream_timeout_s": 10},
        "admin": {"host": "127.0.0.1", "port": admin},
        "auth": {"api_keys": {"file": str(keys)}},
        "policy": {"file": str(tmp / "policy.yaml"), "watch": False},
        "quota": {"store": os.environ.get("SOAK_QUOTA_STORE", "memory"), "key_prefix": f"soak{port}:"},
        "audit": {"file": str(tmp / "audit.log")},
        "models": {
            "m": {"backend": {"type": "http", "protocol": "v2", "upstreams": [upstream]}},
            "bad": {"backend": {"type": "http", "protocol": "v2", "upstreams": [upstream]}},
            "chat": {"backend": {"type": "http", "protocol": "openai", "upstreams": [upstream]}},
        },
    }
    path = tmp / "gateway.yaml"
    path.write_text(json.dumps(config))
    return path, key


def worker_pids(parent: int) -> list[int]:
    try:
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    except OSError:
        return []
    pids = []
    for child in children:  # the workers, not multiprocessing's resource tracker
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        if b"resource_tracker" not in cmdline:
            pids.append(int(child))
    return sorted(pids)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# ---------------------------------------------------------------- traffic

class Tally:
    def __init__(self) -> None:
        self.status: collections.Counter[str] = collections.Counter()
        self.sent_ids: set[str] = set()  # requests the gateway surely read (each must be audited once)
        self.maybe_ids: set[str] = set()  # pipelined behind a stalled answer: audited at most once
        self.provoked_5xx = 0
        self._next = 0

    def rid(self, certain: bool = True) -> str:
        self._next += 1
        rid = f"soak-{self._next}"
        (self.sent_ids if certain else self.maybe_ids).add(rid)
        return rid


async def json_loop(s: aiohttp.ClientSession, url: str, key: str, t: Tally, stop: float, path: str,
                    body: dict[str, Any], label: str) -> None:
    while time.monotonic() < stop:
        try:
            async with s.post(url + path, json=body, headers={"X-API-Key": key, "X-Request-ID": t.rid()}) as r:
                await r.read()
                t.status[f"{label} {r.status}"] += 1
                if path.startswith("/v2/models/bad") and r.status >= 500:
                    t.provoked_5xx += 1
        except aiohttp.ClientError as exc:
            t.status[f"{label} {type(exc).__name__}"] += 1


async def stream_loop(s: aiohttp.ClientSession, url: str, key: str, t: Tally, stop: float, vanish: bool) -> None:
    label = "vanishing-stream" if vanish else "stream"
    body = {"model": "chat", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    while time.monotonic() < stop:
        try:
            async with s.post(url + "/v1/chat/completions", json=body,
                              headers={"X-API-Key": key, "X-Request-ID": t.rid()}) as r:
                if vanish:
                    await r.content.readline()
                    r.close()  # drops the connection mid-stream
                    t.status[f"{label} cut"] += 1
                    await asyncio.sleep(0.1)
                    continue
                text = await r.read()
                ok = r.status == 200 and text.rstrip().endswith(b"data: [DONE]")
                t.status[f"{label} {r.status}{'' if ok else ' incomplete'}"] += 1
        except aiohttp.ClientError as exc:
            t.status[f"{label} {type(exc).__name__}"] += 1


async def half_open(port: int, t: Tally, stop: float) -> None:
    """Half a request head, then silence; reopened each time the gateway closes it."""
    while time.monotonic() < stop:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\n")
            await writer.drain()
            data = await reader.read(65536)
            t.status["half-open closed" + (" with 408" if b" 408 " in data[:16] else "")] += 1
            writer.close()
        except OSError:
            t.status["half-open refused"] += 1
            await asyncio.sleep(0.5)


async def stalled_reader(port: int, key: str, t: Tally, stop: float, write_timeout_s: float) -> None:
    """Asks for more than the socket buffers hold and never reads; the gateway must hang up on it."""
    loop = asyncio.get_running_loop()
    big = orjson.dumps({"model": "chat", "input": ["x"] * 64})
    while time.monotonic() < stop:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", port))
            for i in range(6):  # ~8 MB of answers pipelined: more than the kernel buffers on both sides
                rid = t.rid(certain=i == 0)  # later ones are read only if the earlier ones were taken
                head = (f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}\r\nX-Request-ID: {rid}\r\n"
                        f"Content-Type: application/json\r\nContent-Length: {len(big)}\r\n\r\n").encode()
                await loop.sock_sendall(sock, head + big)
            await asyncio.sleep(write_timeout_s + 3)  # never read meanwhile
            deadline = time.monotonic() + 5
            dropped = False
            while time.monotonic() < deadline:  # now drain: the gateway must have hung up
                try:
                    chunk = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), deadline - time.monotonic())
                except asyncio.TimeoutError:
                    break
                except OSError:  # reset: dropped
                    dropped = True
                    break
                if not chunk:
                    dropped = True
                    break
            t.status["stalled-reader " + ("dropped" if dropped else "NOT dropped")] += 1
        except OSError:
            t.status["stalled-reader refused"] += 1
        finally:
            sock.close()


# ---------------------------------------------------------------- the run

async def sample(proc: subprocess.Popen[bytes], upstream: str, rows: list[dict[str, Any]], started: float) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(upstream + "/_stats") as r:
            conns = (await r.json())["connections"]
    pids = worker_pids(proc.pid)
    row = {"t": round(time.monotonic() - started), "upstream_conns": conns,
           "workers": {pid: (round(rss_mb(pid), 1), fd_count(pid)) for pid in pids}}
    rows.append(row)
    cells = "  ".join(f"w{pid}: {rss:.1f} MB {fds} fds" for pid, (rss, fds) in row["workers"].items())
    print(f"t={row['t']:>4}s  {cells}  upstream conns {conns}", flush=True)


async def soak(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="maas-soak-"))
    port, admin, up_port = free_ports(3)
    upstream = f"http://127.0.0.1:{up_port}"
    up = subprocess.Popen([sys.executable, __file__, "--upstream", str(up_port)],
                          stdout=subprocess.DEVNULL, stderr=open(tmp / "upstream.out", "wb"))
    config, key = write_setup(tmp, port, admin, upstream)
    gw = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "-c", str(config), "--workers", "2"],
                          cwd=ROOT, stdout=open(tmp / "gateway.out", "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    t = Tally()
    rows: list[dict[str, Any]] = []
    try:
        await wait_ready(f"http://127.0.0.1:{admin}/readyz")
        print(f"soak: {args.duration}s against {url} (workers {worker_pids(gw.pid)}), files in {tmp}", flush=True)
        started = time.monotonic()
        stop = started + args.duration
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as s:
            embed = {"model": "chat", "input": ["x"] * 64}
            tasks = [json_loop(s, url, key, t, stop, "/v2/models/m/infer", V2_BODY, "infer") for _ in range(8)]
            tasks += [json_loop(s, url, key, t, stop, "/v1/embeddings", embed, "large") for _ in range(2)]
            tasks += [json_loop(s, url, key, t, stop, "/v2/models/bad/infer", V2_BODY, "provoked-500")]
            tasks += [stream_loop(s, url, key, t, stop, vanish=False) for _ in range(4)]
            tasks += [stream_loop(s, url, key, t, stop, vanish=True) for _ in range(2)]
            tasks += [half_open(port, t, stop) for _ in range(args.half_open)]
            tasks += [stalled_reader(port, key, t, stop, WRITE_TIMEOUT_S) for _ in range(args.stalled)]

            async def sampler() -> None:
                while time.monotonic() < stop:
                    await sample(gw, upstream, rows, started)
                    await asyncio.sleep(args.sample_s)

            await asyncio.gather(sampler(), *tasks)
        print("load stopped; waiting for pools and client connections to idle out", flush=True)
        await asyncio.sleep(args.settle_s)
        await sample(gw, upstream, rows, started)
        final = rows[-1]
        gw.send_signal(signal.SIGTERM)
        code = gw.wait(60)
        return report(args, t, rows, final, code, tmp)
    finally:
        for p in (gw, up):
            if p.poll() is None:
                p.kill()


def report(args: argparse.Namespace, t: Tally, rows: list[dict[str, Any]], final: dict[str, Any], code: int,
           tmp: Path) -> int:
    print("\nanswers by kind and status:")
    for label, n in sorted(t.status.items()):
        print(f"  {label:40} {n}")
    failures: list[str] = []
    bad_5xx = sum(n for label, n in t.status.items()
                  if label.split()[-1].startswith("5") and not label.startswith("provoked"))
    if bad_5xx:
        failures.append(f"{bad_5xx} unprovoked 5xx")
    warm = next((r for r in rows if r["t"] >= args.warmup_s), rows[0])
    for pid, (rss, fds) in final["workers"].items():
        base_rss, base_fds = warm["workers"].get(pid, (rss, fds))
        peak = max(r["workers"].get(pid, (0, 0))[0] for r in rows)
        print(f"worker {pid}: RSS {base_rss:.1f} MB after warm-up -> {rss:.1f} MB at the end (peak {peak:.1f}); "
              f"fds {base_fds} -> {fds}")
        if rss - base_rss > 50:
            failures.append(f"worker {pid} RSS grew {rss - base_rss:.1f} MB")
        if fds > base_fds + 5:
            failures.append(f"worker {pid} holds {fds - base_fds} more fds than after warm-up")
    if final["upstream_conns"] != 0:
        failures.append(f"{final['upstream_conns']} upstream connection(s) still open after {args.settle_s}s idle")
    seen: collections.Counter[str] = collections.Counter()
    for log in sorted(tmp.glob("audit.log.w*")):
        for raw in log.read_bytes().splitlines():
            entry = orjson.loads(raw)
            if entry.get("request_id"):
                seen[entry["request_id"]] += 1
        check = subprocess.run([sys.executable, "-m", "gateway", "audit", "verify", str(log)], cwd=ROOT,
                               capture_output=True, text=True)
        print(f"audit verify: {check.stdout.strip() or check.stderr.strip()}")
        if check.returncode:
            failures.append(f"audit chain of {log.name} does not verify")
    missing = t.sent_ids - set(seen)
    doubled = [rid for rid, n in seen.items() if n > 1]
    unknown = set(seen) - t.sent_ids - t.maybe_ids
    print(f"audit: {sum(seen.values())} lines for {len(t.sent_ids)} requests sent whole "
          f"({len(missing)} missing, {len(doubled)} doubled, {len(unknown)} unknown)")
    if missing or doubled or unknown:
        failures.append(f"audit: {len(missing)} requests without a line, {len(doubled)} with two")
    if code != 0:
        failures.append(f"gateway exited {code} on SIGTERM")
    print("\nRESULT: " + ("PASS" if not failures else "FAIL: " + "; ".join(failures)))
    return 1 if failures else 0


async def wait_ready(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit(f"gateway not ready at {url}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=300)
    p.add_argument("--half-open", type=int, default=100)
    p.add_argument("--stalled", type=int, default=4)
    p.add_argument("--sample-s", type=float, default=15)
    p.add_argument("--warmup-s", type=float, default=60)
    p.add_argument("--settle-s", type=float, default=20, help="idle time before the final sample (> pool keep-alive)")
    p.add_argument("--quick", action="store_true", help="warm-up of 15 s, samples every 5 s")
    p.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.upstream:
        upstream_main(args.upstream)
        return 0
    if args.quick:
        args.warmup_s, args.sample_s = 15, 5
    return asyncio.run(soak(args))


if __name__ == "__main__":
    sys.exit(main())
