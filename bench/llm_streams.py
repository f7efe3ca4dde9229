#!/usr/bin/env python3
"""Streaming overhead of the gateway: time to first token and CPU per event, direct vs through the gateway.

A fast fake upstream (a subprocess) streams 500 events per request for three surfaces: chat completions
(SSE, with the usage chunk the gateway asks for), the Responses API (SSE, ``response.created`` ...
``response.completed``) and Ollama chat (NDJSON, final ``done`` object). Each surface is driven with
``--concurrency`` simultaneous streams, directly and through one gateway process (JWT, a one-rule policy,
a memory token budget, audit), interleaved in rounds in the same run. Printed per surface: median and p99
time to first byte of the body (TTFT) for both targets and the difference, and the gateway's CPU time
per relayed event (its process CPU over the round / events relayed).

    python bench/llm_streams.py                       # 16 concurrent streams, 3 rounds
    python bench/llm_streams.py --concurrency 64 --rounds 5 --events 500

Target (issue 16): under 1 ms added to time to first token at 16 concurrent streams.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

UPSTREAM = r'''
import asyncio, sys, orjson
from aiohttp import web
EVENTS = int(sys.argv[2])
INTERVAL = float(sys.argv[3]) / 1000  # between events: a model producing tokens, not a firehose

async def pace():
    if INTERVAL:
        await asyncio.sleep(INTERVAL)

async def chat(request):
    out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await out.prepare(request)
    for i in range(EVENTS):
        await out.write(b"data: " + orjson.dumps({"id": "c", "object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": {"content": "tok"}}]}) + b"\n\n")
        await pace()
    await out.write(b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":500,'
                    b'"total_tokens":505}}\n\ndata: [DONE]\n\n')
    await out.write_eof()
    return out

async def responses(request):
    out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await out.prepare(request)
    await out.write(b'event: response.created\ndata: {"type":"response.created","response":{"id":"resp_'
                    + str(id(request)).encode() + b'","usage":null}}\n\n')
    for i in range(EVENTS):
        await out.write(b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
                        b'"delta":"tok","sequence_number":' + str(i).encode() + b'}\n\n')
        await pace()
    await out.write(b'event: response.completed\ndata: {"type":"response.completed","response":{"id":"r",'
                    b'"usage":{"input_tokens":5,"output_tokens":500,"total_tokens":505}}}\n\n')
    await out.write_eof()
    return out

async def ollama(request):
    out = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await out.prepare(request)
    for i in range(EVENTS):
        await out.write(b'{"model":"m","message":{"role":"assistant","content":"tok"},"done":false}\n')
        await pace()
    await out.write(b'{"model":"m","done":true,"prompt_eval_count":5,"eval_count":500}\n')
    await out.write_eof()
    return out

app = web.Application()
app.router.add_post("/v1/chat/completions", chat)
app.router.add_post("/v1/responses", responses)
app.router.add_post("/api/chat", ollama)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
'''

SURFACES = {
    "chat-sse": ("/v1/chat/completions", "chat", {"messages": [{"role": "user", "content": "hi"}], "stream": True}),
    "responses-sse": ("/v1/responses", "chat", {"input": "hi", "stream": True}),
    "ollama-ndjson": ("/api/chat", "llama", {"messages": [{"role": "user", "content": "hi"}]}),
}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def one(session: aiohttp.ClientSession, url: str, body: dict, headers: dict) -> tuple[float, int]:
    started = time.perf_counter()
    first = 0.0
    chunks = 0
    async with session.post(url, json=body, headers=headers) as r:
        async for _chunk in r.content.iter_any():
            if not first:
                first = time.perf_counter() - started
            chunks += 1
    return first, chunks


async def round_of(url: str, body: dict, headers: dict, concurrency: int, per_worker: int) -> tuple[list[float], int]:
    """``concurrency`` workers, each running ``per_worker`` streams back to back: after the first wave the
    streams start staggered, each while the others are mid-stream (steady state at that concurrency). The
    first wave, which all start at the same instant, is left out of the TTFT figures."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    streams = 0

    async def worker() -> list[float]:
        nonlocal streams
        times = []
        for i in range(per_worker):
            first, _ = await one(session, url, body, headers)
            streams += 1
            if i:
                times.append(first)
        return times

    async with aiohttp.ClientSession(connector=connector) as session:
        results = await asyncio.gather(*(worker() for _ in range(concurrency)))
    return [t for times in results for t in times], streams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--events", type=int, default=500)
    parser.add_argument("--per-worker", type=int, default=3, help="streams each concurrent worker runs in a row")
    parser.add_argument("--interval-ms", type=float, default=1.0,
                        help="upstream pause between events (0: as fast as it can write)")
    args = parser.parse_args()

    from tests.harness import ALLOW_ANALYSTS, Keys

    work = Path(tempfile.mkdtemp(prefix="maas-llm-bench-"))
    keys = Keys(work / "idp")
    up_port, gw_port = free_port(), free_port()
    script = work / "upstream.py"
    script.write_text(UPSTREAM)
    upstream = subprocess.Popen([sys.executable, str(script), str(up_port), str(args.events), str(args.interval_ms)])
    policy = {**ALLOW_ANALYSTS, "quotas": [{"roles": ["analyst"], "models": ["*"], "tokens_per_minute": 10**9}]}
    (work / "policy.yaml").write_text(yaml.safe_dump(policy))
    backend = {"type": "http", "upstreams": [f"http://127.0.0.1:{up_port}"], "max_connections": 512}
    config = {"server": {"host": "127.0.0.1", "port": gw_port}, "admin": None,
              "auth": {"jwt": keys.jwt_config()}, "policy": {"file": str(work / "policy.yaml"), "watch": False},
              "quota": {"store": "memory"}, "audit": {"file": str(work / "audit.log")},
              "models": {"chat": {"backend": {**backend, "protocol": "openai"}},
                         "llama": {"backend": {**backend, "protocol": "ollama"}}}}
    (work / "gateway.yaml").write_text(yaml.safe_dump(config))
    gateway = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "-c", str(work / "gateway.yaml")],
                               cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        wait_port(up_port)
        wait_port(gw_port)
        headers = {"Authorization": f"Bearer {keys.token('alice', ttl_s=3600)}"}
        asyncio.run(round_of(f"http://127.0.0.1:{gw_port}/v1/chat/completions",
                             {"model": "chat", **SURFACES["chat-sse"][2]}, headers, 4, 1))  # warm up
        report: dict[str, dict[str, list[float]]] = {}
        for _ in range(args.rounds):
            for name, (path, model, body) in SURFACES.items():
                stats = report.setdefault(name, {"direct": [], "gateway": [], "cpu_per_event_us": []})
                direct, _ = asyncio.run(round_of(f"http://127.0.0.1:{up_port}{path}", {"model": model, **body},
                                                 {}, args.concurrency, args.per_worker))
                stats["direct"] += direct
                before = cpu_s(gateway.pid)
                through, streams = asyncio.run(round_of(f"http://127.0.0.1:{gw_port}{path}",
                                                        {"model": model, **body}, headers, args.concurrency,
                                                        args.per_worker))
                stats["gateway"] += through
                used = cpu_s(gateway.pid) - before
                stats["cpu_per_event_us"].append(used / (streams * (args.events + 2)) * 1e6)
        print(f"{args.concurrency} concurrent streams x {args.events} events ({args.interval_ms} ms apart), "
              f"{args.rounds} rounds")
        print(f"{'surface':15} {'TTFT direct p50/p99 ms':>24} {'gateway p50/p99 ms':>20} {'added p50 ms':>13} "
              f"{'gw CPU/event us':>16}")
        for name, stats in report.items():
            d, g = sorted(stats["direct"]), sorted(stats["gateway"])
            p = (lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] * 1000)
            print(f"{name:15} {p(d, .5):11.2f}/{p(d, .99):<12.2f} {p(g, .5):9.2f}/{p(g, .99):<10.2f} "
                  f"{p(g, .5) - p(d, .5):13.2f} {statistics.median(stats['cpu_per_event_us']):16.1f}")
        print(json.dumps({n: {k: statistics.median(v) for k, v in s.items()} for n, s in report.items()}))
    finally:
        gateway.terminate()
        upstream.terminate()
        gateway.wait(10)
        upstream.wait(10)


if __name__ == "__main__":
    main()
