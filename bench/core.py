#!/usr/bin/env python3
"""The gateway's own cost per request, with the sockets taken out: µs of Python per proxied request.

The reference harness measures the whole machine (wrk, nginx, the kernel and
the gateway on two shared cores), and ``bench/instructions.py`` counts a
gateway's instructions under valgrind (minutes per variant). This runs the
real request path of a real ``Gateway`` -- the connection's parser and limits,
the door, every stage, the upstream client's pool, parser and header rules,
the audit chain and the metrics -- in one process, on transports that hand
bytes over in memory: a client connection gets the next request as soon as its
answer is written, an upstream connection answers each request on the next
loop turn with what the harness's nginx answers. What is left is exactly what
the gateway adds per request in Python, in seconds: a trim of 1 % shows, and
an A/B against another checkout takes half a minute.

    python bench/core.py                                # binary v2 request, harness-like pipeline
    python bench/core.py --json --compare /tmp/gw-base  # the JSON body; A/B with another checkout
    python bench/core.py --redis redis://127.0.0.1:6379/0 --profile   # cProfile's top functions too

The pipeline is the reference harness's (``bench/shared_harness_gateway.sh``:
JWT, one ``when`` rule, a rate quota, the audit log); the quota store is in
memory unless ``--redis`` names one (then its allowances make Redis calls rare).
Rounds alternate between the checkouts; the median of each is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM_PORT = 9  # the model's upstream: never a real socket (discard), every connection to it is in memory

ANSWER = (b'{"model_name":"digits","model_version":"1","id":"bench-0001","outputs":[{"name":"output-0","shape":[1,10],'
          b'"datatype":"FP32","data":[-2.3124,-2.2871,-2.3019,-2.2805,-2.3311,-2.2702,-2.3140,-2.3007,-2.2933,-2.3218]}]}')
UPSTREAM_ANSWER = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Thu, 03 Dec 2026 12:00:00 GMT\r\n"
                   b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n%s"
                   % (len(ANSWER), ANSWER))
JSON_BODY = {"id": "bench", "inputs": [{"name": "input-0", "shape": [1, 784], "datatype": "FP32",
                                        "data": [round(i / 784, 4) for i in range(784)]}]}


def request_bytes(token: str, *, binary: bool) -> bytes:
    """What wrk sends for the reference harness's binary (or JSON) v2 body."""
    if binary:
        values = struct.pack("<784f", *(i / 784 for i in range(784)))
        header = json.dumps({"id": "bench", "inputs": [{"name": "input-0", "shape": [1, 784], "datatype": "FP32",
                                                         "parameters": {"binary_data_size": len(values)}}]},
                            separators=(",", ":")).encode()
        body = header + values
        extra = b"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: %d\r\n" % len(header)
    else:
        body = json.dumps(JSON_BODY, separators=(",", ":")).encode()
        extra = b"Content-Type: application/json\r\n"
    return (b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: 127.0.0.1:18091\r\nAuthorization: Bearer %s\r\n"
            b"%sContent-Length: %d\r\n\r\n%s" % (token.encode(), extra, len(body), body))


class _Transport(asyncio.Transport):
    """The parts of ``asyncio.Transport`` the gateway's protocols use, in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    abort = close

    def writelines(self, data: list[bytes]) -> None:
        self.write(b"".join(data))  # type: ignore[attr-defined]


class ClientTransport(_Transport):
    """A keep-alive client: sends the next request as soon as the last answer is written."""

    def __init__(self, bench: Bench) -> None:
        super().__init__()
        self.bench = bench
        self.protocol: Any = None

    def write(self, data: bytes) -> None:
        self.bench.answered(self, data)


class UpstreamTransport(_Transport):
    """An upstream that answers every request on the next loop turn (nginx's fixed answer)."""

    def __init__(self, connection: Any) -> None:
        super().__init__()
        self.connection = connection
        self.loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        self.loop.call_soon(self.connection.data_received, UPSTREAM_ANSWER)


class Bench:
    def __init__(self, request: bytes, total: int) -> None:
        self.request = request
        self.left = total
        self.open = 0
        self.done = asyncio.get_running_loop().create_future()
        self.errors = 0

    def answered(self, tr: ClientTransport, data: bytes) -> None:
        if not data.startswith(b"HTTP/1.1 200"):
            self.errors += 1
            if self.errors == 1:
                print(data[:400].decode("latin-1"), file=sys.stderr)
        if self.left > 0:
            self.left -= 1
            asyncio.get_running_loop().call_soon(tr.protocol.data_received, self.request)
            return
        self.open -= 1
        if not self.open and not self.done.done():
            self.done.set_result(None)


class InMemoryLoop(uvloop.Loop):  # type: ignore[misc]
    """uvloop, except that connections to upstreams are made in memory (the pool's own code runs unchanged)."""

    async def create_connection(self, protocol_factory: Any, host: Any = None, port: Any = None,
                                **kwargs: Any) -> tuple[Any, Any]:
        if port != UPSTREAM_PORT:  # Redis (--redis) is a real one
            return await super().create_connection(protocol_factory, host, port, **kwargs)
        protocol = protocol_factory()
        transport = UpstreamTransport(protocol)
        protocol.connection_made(transport)
        return transport, protocol


def config(work: Path, keys: Any, redis: str | None) -> Path:
    (work / "policy.yaml").write_text("""rules:
  - {id: inference-role, roles: ["*"], models: [digits], actions: [infer, read], effect: allow,
     when: "subject.role == 'inference'"}
quotas:
  - {roles: ["*"], models: ["*"], rate_per_s: 100000000, burst: 100000000}
""")
    jwt = keys.jwt_config()
    cfg = {
        "server": {"host": "127.0.0.1", "port": 0, "upstream_timeout_s": 10},
        "admin": None,
        "auth": {"jwt": jwt},
        "policy": {"file": str(work / "policy.yaml"), "watch": False},
        "models": {"digits": {"backend": {"type": "http", "protocol": "v2", "upstreams": [f"http://127.0.0.1:{UPSTREAM_PORT}"]}}},
        "quota": {"store": redis or "memory", "on_store_error": "deny", "key_prefix": f"core{os.getpid()}:"},
        "audit": {"file": str(work / "audit.log")},
    }
    path = work / "gateway.yaml"
    path.write_text(json.dumps(cfg))
    return path


async def measure(args: argparse.Namespace) -> list[float]:
    sys.path.insert(0, str(ROOT / "tests"))
    from harness import Keys

    from gateway.config import load_config
    from gateway.http_connection import ClientConnection
    from gateway.server import start

    work = Path(tempfile.mkdtemp(prefix="maas-core-"))
    keys = Keys(work / "idp")
    token = keys.token("bench", None, role="inference", ttl_s=3600)
    running = await start(load_config(config(work, keys, args.redis)), port=0)
    request = request_bytes(token, binary=not args.json)
    results = []
    try:
        for round_ in range(args.rounds + 1):  # the first round warms up (caches, pooled connections)
            bench = Bench(request, args.n)
            connections = []
            for _ in range(args.connections):
                tr = ClientTransport(bench)
                conn = ClientConnection(running.listener)
                tr.protocol = conn
                conn.connection_made(tr)  # type: ignore[arg-type]
                connections.append((conn, tr))
            bench.open = len(connections)
            started = time.perf_counter()
            for conn, _ in connections:
                bench.left -= 1
                conn.data_received(request)
            await bench.done
            elapsed = time.perf_counter() - started
            for conn, tr in connections:
                tr.closed = True
                conn.connection_lost(None)
            if bench.errors:
                raise SystemExit(f"{bench.errors} answers were not 200")
            if round_:
                results.append(elapsed / args.n * 1e6)
    finally:
        await running.stop()
    return results


def run(coroutine: Any) -> Any:
    with asyncio.Runner(loop_factory=InMemoryLoop) as runner:
        return runner.run(coroutine)


def run_tree(tree: Path, args: argparse.Namespace) -> list[float]:
    """One round set in a fresh process of ``tree`` (its own imports), as JSON on stdout."""
    cmd = [sys.executable, str(ROOT / "bench" / "core.py"), "--child", "-n", str(args.n), "--rounds", "1",
           "-c", str(args.connections)] + (["--json"] if args.json else []) + (
        ["--redis", args.redis] if args.redis else [])
    out = subprocess.run(cmd, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise SystemExit(f"{tree}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=20000, help="requests per round")
    ap.add_argument("-c", "--connections", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="the JSON body instead of binary tensors")
    ap.add_argument("--redis", default=None, help="quota store URL (default: in memory)")
    ap.add_argument("--compare", type=Path, default=None, help="another checkout, measured in alternating rounds")
    ap.add_argument("--profile", action="store_true", help="one round under cProfile: the top functions")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run(measure(args))))
        return
    if args.profile:
        import cProfile
        import pstats

        profile = cProfile.Profile()
        args.rounds = 1
        profile.runcall(run, measure(args))
        pstats.Stats(profile).sort_stats("tottime").print_stats(40)
        return
    trees = {"this": ROOT} | ({"base": args.compare.resolve()} if args.compare else {})
    seen: dict[str, list[float]] = {label: [] for label in trees}
    for _ in range(args.rounds):
        for label, tree in trees.items():
            seen[label] += run_tree(tree, args)
    kind = "JSON" if args.json else "binary"
    for label, values in seen.items():
        print(f"{label:5s} {kind} {statistics.median(values):7.2f} µs/request (rounds: "
              f"{', '.join(f'{v:.2f}' for v in values)})")
    if args.compare:
        ratio = statistics.median(seen["this"]) / statistics.median(seen["base"])
        print(f"this/base {ratio:.3f}")


if __name__ == "__main__":
    main()
