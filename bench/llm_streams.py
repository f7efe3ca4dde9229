#!/usr/bin/env python3
"""Streaming overhead of the gateway: time to first token and CPU per event, direct vs through the gateway.

A fast fake upstream (a subprocess: a raw asyncio protocol on uvloop with one timer for all its streams,
each tick writing the next event of every open stream, as a batching LLM server emits one token per
sequence per step) streams 500 events per request for three surfaces: chat completions (SSE, with the
usage chunk the gateway asks for), the Responses API (SSE, ``response.created`` ... ``response.completed``)
and Ollama chat (NDJSON, final ``done`` object). Each surface is driven with ``--concurrency`` streams at
once, their starts spread over one stream's length (steady state: each new request arrives while the
others are mid-stream; ``--burst`` starts them together instead), directly and through one gateway process
(JWT, a one-rule policy, a memory token budget, audit), interleaved in rounds in the same run. The client
is a raw keep-alive connection per stream, not an HTTP library, and the fake upstream costs a few
microseconds per event: on two cores a library client and an aiohttp fake cost more CPU than the gateway
and their own latency swamped what the gateway adds. Printed per surface: median and p99 time to the
first body byte (TTFT) for both targets and the difference, and the gateway's CPU time per relayed event
(its process CPU over the round / events relayed).

    python bench/llm_streams.py                       # 16 concurrent streams, 3 rounds
    python bench/llm_streams.py --concurrency 64 --rounds 5 --events 500
    python bench/llm_streams.py --burst               # 16 requests arriving at the same instant
    python bench/llm_streams.py --pin                 # the gateway on a core of its own

``--pin`` runs the gateway (and the floors) on CPU 0 and this client and the fake upstream on the others, as a
deployment does (a gateway does not share its cores with its clients and its model server). Unpinned, on a
two-core machine the three processes take turns on both cores and evict each other's caches between two
requests: the gateway's request path, ~90 us of CPU warm in-process, then runs several times slower (parsing one
request head: 6 us warm, 60-90 us measured here), and that, not the work itself, is most of what it adds.

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
from typing import Any

import uvloop
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

UPSTREAM = r'''
# The fast fake upstream: raw asyncio protocol on uvloop, one timer for all streams (a tick writes the next
# event of every open stream), so that what the bench measures is the gateway, not the fake's own CPU.
import asyncio, sys, uvloop
EVENTS = int(sys.argv[2])
INTERVAL = float(sys.argv[3]) / 1000  # between events: a model producing tokens, not a firehose
HEAD = {"sse": b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
        "ndjson": b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"}
CHAT = (b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"tok"}}]}\n\n')
CHAT_END = (b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":500,'
            b'"total_tokens":505}}\n\ndata: [DONE]\n\n')
RESP = (b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"tok",'
        b'"sequence_number":%d}\n\n')
RESP_END = (b'event: response.completed\ndata: {"type":"response.completed","response":{"id":"r",'
            b'"usage":{"input_tokens":5,"output_tokens":500,"total_tokens":505}}}\n\n')
OLLAMA = b'{"model":"m","message":{"role":"assistant","content":"tok"},"done":false}\n'
OLLAMA_END = b'{"model":"m","done":true,"prompt_eval_count":5,"eval_count":500}\n'
ACTIVE = {}  # protocol -> [kind, events sent]
ids = iter(range(10**9))

def chunk(data):
    return b"%x\r\n%s\r\n" % (len(data), data)

def event(kind, i):
    return CHAT if kind == "chat" else RESP % i if kind == "responses" else OLLAMA

class Stream(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.buffer = transport, b""
    def connection_lost(self, exc):
        ACTIVE.pop(self, None)
    def data_received(self, data):
        self.buffer += data
        self.next_request()
    def next_request(self):
        if self in ACTIVE:
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buffer[:end].decode("latin-1")
        length = 0
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if len(self.buffer) < end + 4 + length:
            return
        self.buffer = self.buffer[end + 4 + length:]
        path = head.split(" ", 2)[1]
        kind = "responses" if path.endswith("/responses") else "ollama" if path.startswith("/api/") else "chat"
        first = (b'event: response.created\ndata: {"type":"response.created","response":{"id":"resp_%d",'
                 b'"usage":null}}\n\n' % next(ids)) if kind == "responses" else event(kind, 0)
        self.transport.write(HEAD["ndjson" if kind == "ollama" else "sse"] + chunk(first))
        ACTIVE[self] = [kind, 0 if kind == "responses" else 1]

def tick():
    loop.call_later(INTERVAL, tick)
    for proto, state in list(ACTIVE.items()):
        kind, sent = state
        if sent < EVENTS:
            proto.transport.write(chunk(event(kind, sent)))
            state[1] = sent + 1
            continue
        end = CHAT_END if kind == "chat" else RESP_END if kind == "responses" else OLLAMA_END
        proto.transport.write(chunk(end) + b"0\r\n\r\n")
        del ACTIVE[proto]
        proto.next_request()

loop = uvloop.new_event_loop()
loop.run_until_complete(loop.create_server(Stream, "127.0.0.1", int(sys.argv[1])))
loop.call_later(INTERVAL, tick)
loop.run_forever()
'''

TCP_RELAY = r'''
# Floor 1: a byte relay (uvloop, no HTTP): what any proxy hop costs on this machine.
import asyncio, sys, uvloop
UP, PORT = int(sys.argv[1]), int(sys.argv[2])
class Up(asyncio.Protocol):
    def __init__(self, down): self.down = down
    def connection_made(self, t): self.t = t
    def data_received(self, d): self.down.t.write(d)
    def connection_lost(self, e): self.down.t.close()
class Down(asyncio.Protocol):
    def connection_made(self, t):
        self.t, self.up, self.early = t, None, []
        asyncio.get_running_loop().create_task(self.connect())
    async def connect(self):
        _, self.up = await asyncio.get_running_loop().create_connection(lambda: Up(self), "127.0.0.1", UP)
        for d in self.early: self.up.t.write(d)
    def data_received(self, d):
        self.up.t.write(d) if self.up else self.early.append(d)
    def connection_lost(self, e):
        if self.up: self.up.t.close()
async def main():
    await asyncio.get_running_loop().create_server(Down, "127.0.0.1", PORT)
    await asyncio.Event().wait()
uvloop.run(main())
'''

HTTP_RELAY = r'''
# Floor 2: aiohttp's server and the gateway's upstream client relaying the stream, no checks at all.
import asyncio, sys, uvloop
from aiohttp import web
sys.path.insert(0, sys.argv[3])
from backends.http.client import Origin, Pool
async def main():
    pool = Pool(limit=512, keepalive_s=4, connect_timeout_s=3, ssl_context=None)
    origin = Origin.parse(f"http://127.0.0.1:{sys.argv[1]}")
    async def handle(request):
        body = await request.read()
        resp = await pool.request(origin, "POST", request.path, [("Content-Type", "application/json")], body, 10)
        out = web.StreamResponse(headers={"Content-Type": resp.header("Content-Type") or "text/event-stream"})
        await out.prepare(request)
        try:
            while chunk := await resp.readany():
                await out.write(chunk)
        finally:
            resp.release()
        await out.write_eof()
        return out
    runner = web.ServerRunner(web.Server(handle))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", int(sys.argv[2])).start()
    await asyncio.Event().wait()
uvloop.run(main())
'''

PARSER_RELAY = r'''
# Floor 3: a request parser of its own (httptools, what the upstream client already uses) in place of
# aiohttp's server, the same upstream client, chunks written straight to the socket; still no checks.
import asyncio, sys, httptools, uvloop
sys.path.insert(0, sys.argv[3])
from backends.http.client import Origin, Pool
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nTransfer-Encoding: chunked\r\n\r\n"
class Door(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.parser, self.body = transport, httptools.HttpRequestParser(self), []
    def data_received(self, data):
        self.parser.feed_data(data)
    def on_url(self, url):
        self.url = url.decode()
    def on_body(self, body):
        self.body.append(body)
    def on_message_complete(self):
        body, self.body = b"".join(self.body), []
        asyncio.get_running_loop().create_task(self.relay(self.url, body))
    async def relay(self, url, body):
        resp = await POOL.request(ORIGIN, "POST", url, [("Content-Type", "application/json")], body, 10)
        try:
            first = True
            while chunk := await resp.readany():
                framed = b"%x\r\n%b\r\n" % (len(chunk), chunk)
                if first:
                    framed = HEAD % (resp.header("Content-Type") or "text/event-stream").encode() + framed
                    first = False
                self.transport.write(framed)
            self.transport.write(b"0\r\n\r\n")
        finally:
            resp.release()
async def main():
    global POOL, ORIGIN
    POOL = Pool(limit=512, keepalive_s=4, connect_timeout_s=3, ssl_context=None)
    ORIGIN = Origin.parse(f"http://127.0.0.1:{sys.argv[1]}")
    await asyncio.get_running_loop().create_server(Door, "127.0.0.1", int(sys.argv[2]))
    await asyncio.Event().wait()
uvloop.run(main())
'''

SURFACES: dict[str, tuple[str, str, dict[str, Any]]] = {
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


class Client(asyncio.Protocol):
    """One keep-alive client connection: sends a request, notes when the first body byte arrives, reads to the
    end of the chunked answer. A raw protocol, not an HTTP client library: at 16,000 events a second a
    library's per-chunk cost would load the two cores the gateway is measured on."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.started = self.first = 0.0
        self.headed = False
        self.done: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.headed:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self.buffer.startswith(b"HTTP/1.1 200"):
                raise SystemExit(f"not a 200: {self.buffer[:200]!r}")
            self.headed = True
            self.buffer = self.buffer[end + 4:]
        if not self.first and self.buffer:
            self.first = time.perf_counter() - self.started
        ended = self.buffer == b"0\r\n\r\n" or self.buffer.endswith(b"\r\n0\r\n\r\n")  # the last chunk
        if ended:
            if self.done is not None and not self.done.done():
                self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("connection closed mid-answer"))

    async def stream(self, request: bytes) -> float:
        self.buffer, self.first, self.headed = b"", 0.0, False
        self.done = asyncio.get_running_loop().create_future()
        self.started = time.perf_counter()
        assert self.transport is not None
        self.transport.write(request)
        await self.done
        return self.first


def request_bytes(port: int, path: str, body: dict, headers: dict) -> bytes:
    payload = json.dumps(body).encode()
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n{lines}"
            f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload


async def round_of(port: int, request: bytes, concurrency: int, per_worker: int,
                   stream_s: float = 0.0) -> tuple[list[float], int]:
    """``concurrency`` workers, each running ``per_worker`` streams back to back on one keep-alive connection.

    Worker ``k`` starts ``k * stream_s / concurrency`` after the first (``stream_s``: how long one stream
    lasts), so requests arrive spread out, each while the others are mid-stream: the steady state of that
    many concurrent streams. (Started together, every stream would end in the same upstream tick and the
    next ones would arrive as a burst of ``concurrency`` at once, measuring a queue of simultaneous
    arrivals instead.) Each worker's first stream, started while the others ramp up, is left out."""
    loop = asyncio.get_running_loop()
    workers = iter(range(concurrency))

    async def worker() -> list[float]:
        await asyncio.sleep(next(workers) * stream_s / concurrency)
        _, client = await loop.create_connection(Client, "127.0.0.1", port)
        try:
            return [first for i in range(per_worker) if (first := await client.stream(request)) and i]
        finally:
            assert client.transport is not None
            client.transport.close()

    results = await asyncio.gather(*(worker() for _ in range(concurrency)))
    return [t for times in results for t in times], concurrency * per_worker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--events", type=int, default=500)
    parser.add_argument("--per-worker", type=int, default=3, help="streams each concurrent worker runs in a row")
    parser.add_argument("--interval-ms", type=float, default=1.0,
                        help="upstream pause between events (0: as fast as it can write)")
    parser.add_argument("--burst", action="store_true",
                        help="start every stream of a round at the same instant (default: spread out)")
    parser.add_argument("--floors", action="store_true",
                        help="also relay chat-sse through a byte relay, through a bare httptools server and through "
                             "aiohttp's server, each with the gateway's upstream client and no checks: what a hop "
                             "and an HTTP stack cost before any gateway logic")
    parser.add_argument("--pin", action="store_true",
                        help="the gateway and floors on CPU 0, this client and the fake upstream on the other CPUs")
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    gateway_cpus, bench_cpus = ({cpus[0]}, set(cpus[1:])) if args.pin and len(cpus) > 1 else (set(cpus), set(cpus))
    os.sched_setaffinity(0, bench_cpus)  # the client, and the fake upstream it starts

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
    pinned = (lambda: os.sched_setaffinity(0, gateway_cpus))
    gateway = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "-c", str(work / "gateway.yaml")],
                               cwd=ROOT, stdout=subprocess.DEVNULL, preexec_fn=pinned)
    floors: dict[str, tuple[int, subprocess.Popen[bytes]]] = {}
    if args.floors:
        for name, code in (("byte relay", TCP_RELAY), ("httptools+client", PARSER_RELAY),
                           ("aiohttp+client", HTTP_RELAY)):
            port = free_port()
            script_file = work / f"{name.split()[0].replace('+', '_')}.py"
            script_file.write_text(code)
            floors[name] = port, subprocess.Popen([sys.executable, str(script_file), str(up_port), str(port),
                                                   str(ROOT)],
                                                  preexec_fn=pinned)
    try:
        wait_port(up_port)
        wait_port(gw_port)
        for port, _ in floors.values():
            wait_port(port)
        headers = {"Authorization": f"Bearer {keys.token('alice', ttl_s=3600)}"}
        warm = request_bytes(gw_port, "/v1/chat/completions", {"model": "chat", **SURFACES["chat-sse"][2]}, headers)
        uvloop.run(round_of(gw_port, warm, 4, 1))  # warm up
        report: dict[str, dict[str, list[float]]] = {}
        stream_s = 0.0 if args.burst else args.events * args.interval_ms / 1000
        for _ in range(args.rounds):
            for name, (path, model, body) in SURFACES.items():
                stats = report.setdefault(name, {"direct": [], "gateway": [], "cpu_per_event_us": []})
                direct, _ = uvloop.run(round_of(up_port, request_bytes(up_port, path, {"model": model, **body}, {}),
                                                args.concurrency, args.per_worker, stream_s))
                stats["direct"] += direct
                before = cpu_s(gateway.pid)
                through, streams = uvloop.run(round_of(gw_port, request_bytes(gw_port, path, {"model": model, **body},
                                                                             headers),
                                                       args.concurrency, args.per_worker, stream_s))
                stats["gateway"] += through
                used = cpu_s(gateway.pid) - before
                stats["cpu_per_event_us"].append(used / (streams * (args.events + 2)) * 1e6)
            for floor, (port, relay) in floors.items():
                path, model, body = SURFACES["chat-sse"]
                before = cpu_s(relay.pid)
                times, streams = uvloop.run(round_of(port, request_bytes(port, path, {"model": model, **body}, {}),
                                                     args.concurrency, args.per_worker, stream_s))
                stats = report.setdefault(f"chat-sse {floor}", {"direct": [], "gateway": [], "cpu_per_event_us": []})
                stats["gateway"] += times
                stats["cpu_per_event_us"].append((cpu_s(relay.pid) - before) / (streams * (args.events + 2)) * 1e6)
        print(f"{args.concurrency} concurrent streams x {args.events} events ({args.interval_ms} ms apart), "
              f"{args.rounds} rounds")
        print(f"{'surface':25} {'TTFT direct p50/p99 ms':>24} {'through p50/p99 ms':>20} {'added p50 ms':>13} "
              f"{'gw CPU/event us':>16}")
        for name, stats in report.items():
            if not stats["direct"]:  # a floor: compared with chat-sse's direct times
                stats["direct"] = report["chat-sse"]["direct"]
            d, g = sorted(stats["direct"]), sorted(stats["gateway"])
            p = (lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] * 1000)
            print(f"{name:25} {p(d, .5):11.2f}/{p(d, .99):<12.2f} {p(g, .5):9.2f}/{p(g, .99):<10.2f} "
                  f"{p(g, .5) - p(d, .5):13.2f} {statistics.median(stats['cpu_per_event_us']):16.1f}")
        print(json.dumps({n: {k: statistics.median(v) for k, v in s.items()} for n, s in report.items()}))
    finally:
        for _, relay in floors.values():
            relay.terminate()
        gateway.terminate()
        upstream.terminate()
        gateway.wait(10)
        upstream.wait(10)


if __name__ == "__main__":
    main()
