#!/usr/bin/env python3
"""The local torch runner: batching in-process, and the whole gateway against the seed Flask app.

Two measurements, both on the seed's own model (``seed-mlp``: 784 -> 128 -> 10,
random weights) and the same 784-float input:

* ``runner`` (default): the backend alone, in-process — 64 concurrent callers
  send a parsed v2 request to ``TorchBackend.handle``; once with batching
  (``max_batch_size 64``) and once without (``max_batch_size 1``). Shows what
  batching buys and the batch sizes it forms.
* ``--http``: side by side in one run, interleaved rounds, ``wrk -c64``:
  the seed app (``/work/shared/bench/seed_flask_app.py`` under ``gunicorn -w 2``)
  and maas-gateway with the *full* security pipeline (RS256 JWT, policy,
  in-memory quota, v2 validation, audit log) in front of the torch runner.
  Needs ``wrk`` and, for the seed, a Python path holding flask, flask-cors,
  flask-limiter and gunicorn (``--seed-pythonpath``; e.g. ``pip install --target
  /tmp/seedlib flask==3.1.3 flask-cors==6.0.5 flask-limiter==4.1.1 gunicorn==27.0.1``).

    python bench/bench_runner.py                      # in-process, ~15 s
    python bench/bench_runner.py --device cuda --arch bench.bench_runner:WideMLP   # GPU, larger model
    python bench/bench_runner.py --http --seed-pythonpath /tmp/seedlib --rounds 3 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
SEED_APP = Path("/work/shared/bench/seed_flask_app.py")

from overhead import WRK_LUA, free_port  # noqa: E402
from overhead import run_wrk_url as run_wrk  # noqa: E402  (one wrk script and helpers for every bench)
from overhead import wait_port as wait_http  # noqa: E402


def _wide_mlp() -> Any:
    import torch.nn.functional as F
    from torch import nn

    class WideMLP(nn.Module):
        """A larger model for GPU runs: 784 -> 4096 -> 4096 -> 10 (~20 M parameters)."""

        input_shape = (784,)
        output_shape = (10,)

        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(784, 4096), nn.Linear(4096, 4096), nn.Linear(4096, 10)

        def forward(self, x: Any) -> Any:
            return F.log_softmax(self.fc3(F.relu(self.fc2(F.relu(self.fc1(x))))), dim=1)

    return WideMLP


def __getattr__(name: str) -> Any:  # "bench.bench_runner:WideMLP" resolves lazily (no torch import at module load)
    if name == "WideMLP":
        return _wide_mlp()
    raise AttributeError(name)


def write_weights(path: Path, arch: str) -> None:
    import torch
    from safetensors.torch import save_file

    from backends.torch.archs import instantiate

    torch.manual_seed(0)
    model = instantiate(arch)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def sample_pixels(n: int = 784) -> list[float]:
    import random

    rnd = random.Random(0)
    return [round(rnd.random(), 4) for _ in range(n)]


# ---------------------------------------------------------------------------
# in-process


async def run_inprocess(weights: Path, arch: str, max_batch: int, device: str, clients: int, seconds: float) -> dict[str, Any]:
    from backends.torch import TorchBackend, TorchBackendConfig
    from gateway.backend import BackendEnv
    from gateway.config import ModelConfig, ServerConfig
    from gateway.metrics import Metrics
    from gateway.pipeline import RequestContext, Route, RouteKind
    from gateway.request import BufferedRequest
    from gateway.typedyaml import Source, build

    source = Source(file="bench", base_dir=weights.parent)
    model = build(ModelConfig, {"backend": {"type": "torch", "path": str(weights), "arch": arch, "device": device,
                                            "max_batch_size": max_batch, "max_batch_delay_ms": 2}}, "m", source)
    backend = TorchBackend("m", model, model.backend.build(TorchBackendConfig), BackendEnv(ServerConfig(), Metrics()))
    await backend.start()
    width = backend.declared_inputs()[0].shape[1]  # type: ignore[index]
    payload = {"inputs": [{"name": "input", "shape": [1, width], "datatype": "FP32", "data": sample_pixels(width)}]}
    route = Route(RouteKind.V2_INFER, "infer", "m", True)
    request = BufferedRequest("POST", "/v2/models/m/infer")
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def client() -> None:
        while time.perf_counter() < stop:
            ctx = RequestContext(request, "r", 0.0)
            ctx.route, ctx.json = route, payload
            t0 = time.perf_counter()
            await backend.handle(ctx)
            latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    stats = backend.stats()
    await backend.close()
    latencies.sort()
    return {"req_s": len(latencies) / elapsed, "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)], "mean_batch": stats["mean_batch_size"],
            "max_batch": stats["max_batch_size_seen"], "device": backend.info["device"]}


def inprocess_main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="maas-bench-runner-"))
    weights = work / "model.safetensors"
    write_weights(weights, args.arch)
    print(f"in-process: arch {args.arch}, {args.clients} concurrent callers, {args.duration:.0f} s per mode")
    print(f"{'mode':12} {'device':6} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'mean batch':>11} {'max batch':>10}")
    for label, max_batch in (("batched", 64), ("unbatched", 1)):
        r = asyncio.run(run_inprocess(weights, args.arch, max_batch, args.device, args.clients, args.duration))
        print(f"{label:12} {r['device']:6} {r['req_s']:9,.0f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} "
              f"{r['mean_batch']:11.1f} {r['max_batch']:10d}")
    shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------
# over HTTP, against the seed


def gateway_setup(work: Path, weights: Path, workers: int) -> tuple[Path, str]:
    import yaml
    from harness import Keys

    keys = Keys(work / "idp")
    policy = {"roles": {"inference": []},
              "rules": [{"id": "inference-digits", "roles": ["inference"], "models": ["digits"],
                         "actions": ["infer", "read"], "effect": "allow"}],
              "quotas": [{"roles": ["inference"], "models": ["*"], "rate_per_s": 1_000_000, "burst": 1_000_000}]}
    (work / "policy.yaml").write_text(yaml.safe_dump(policy))
    config = {
        "server": {"host": "127.0.0.1", "port": free_port(), "workers": workers},
        "admin": {"host": "127.0.0.1", "port": free_port()},
        "auth": {"jwt": keys.jwt_config()},
        "policy": {"file": "policy.yaml", "watch": False},
        "quota": {"store": "memory"},
        "audit": {"file": "audit.log"},
        "models": {"digits": {
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 784]}],
            "backend": {"type": "torch", "path": str(weights), "arch": "seed-mlp", "max_batch_size": 64,
                        "max_batch_delay_ms": 2}}},
    }
    path = work / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, "Bearer " + keys.token("bench", ["inference"], ttl_s=3600)


def http_main(args: argparse.Namespace) -> None:
    import yaml

    if not shutil.which("wrk"):
        raise SystemExit("wrk not found: apt-get install wrk")
    work = Path(tempfile.mkdtemp(prefix="maas-bench-http-"))
    weights = work / "seed.safetensors"
    write_weights(weights, "seed-mlp")
    pixels = sample_pixels()
    (work / "v2.json").write_text(json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784],
                                                          "data": pixels}]}))
    (work / "seed.json").write_text(json.dumps({"img": pixels}))
    lua = work / "post.lua"
    lua.write_text(WRK_LUA)
    config, token = gateway_setup(work, weights, args.workers)
    data = yaml.safe_load(config.read_text())
    gw_port, admin_port = data["server"]["port"], data["admin"]["port"]
    procs: list[subprocess.Popen[bytes]] = []
    targets: list[tuple[str, str, Path, str]] = []
    try:
        log = open(work / "gateway.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "gateway", "serve", "-c", str(config)], cwd=ROOT,
                                      start_new_session=True, stdout=log, stderr=log))
        wait_http(gw_port)
        targets.append(("maas-gateway", f"http://127.0.0.1:{gw_port}/v2/models/digits/infer", work / "v2.json", token))
        if args.seed_pythonpath is not None and SEED_APP.is_file():
            seed_port = free_port()
            env = {**os.environ, "PYTHONPATH": f"{args.seed_pythonpath}:{SEED_APP.parent}"}
            slog = open(work / "seed.log", "w")
            procs.append(subprocess.Popen([sys.executable, "-m", "gunicorn", "-w", "2", "-b", f"127.0.0.1:{seed_port}",
                                           "--no-control-socket", "seed_flask_app:app"], cwd=SEED_APP.parent, env=env,
                                          start_new_session=True, stdout=slog, stderr=slog))
            wait_http(seed_port)
            targets.insert(0, ("seed-gunicorn", f"http://127.0.0.1:{seed_port}/predict", work / "seed.json", token))
        else:
            print("seed app not started (give --seed-pythonpath with flask, flask-cors, flask-limiter, gunicorn)")
        for name, url, body, auth in targets:  # smoke + warm-up
            run_wrk(url, args.conns, args.warmup, lua, body, auth)
        results: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in targets}
        for rnd in range(args.rounds):
            for name, url, body, auth in targets:
                r = run_wrk(url, args.conns, args.duration, lua, body, auth)
                results[name].append(r)
                print(f"round {rnd + 1} {name:14} {r['rps']:8,.0f} req/s  p50 {r['p50_us'] / 1000:6.2f} ms  "
                      f"p99 {r['p99_us'] / 1000:7.2f} ms  non-2xx {r['non2xx']}  errors {r['errors']}", flush=True)
        metrics = subprocess.run(["curl", "-s", f"http://127.0.0.1:{admin_port}/metrics"], capture_output=True,
                                 text=True, timeout=10).stdout
        print(f"\nmedians over {args.rounds} round(s), wrk -c{args.conns}, {args.duration:.0f} s each:")
        base = None
        for name in results:
            rps = statistics.median(r["rps"] for r in results[name])
            p50 = statistics.median(r["p50_us"] for r in results[name]) / 1000
            p99 = statistics.median(r["p99_us"] for r in results[name]) / 1000
            base = base or rps
            print(f"  {name:14} {rps:8,.0f} req/s  p50 {p50:6.2f} ms  p99 {p99:7.2f} ms  x{rps / base:.2f}")
        print("  gateway batch sizes (requests per forward pass): " + batch_summary(metrics))
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(p.pid, signal.SIGKILL)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work dir kept: {work}")


def batch_summary(exposition: str) -> str:
    buckets: list[tuple[str, float]] = []
    total = count = 0.0
    for line in exposition.splitlines():
        if line.startswith("maas_runner_batch_size_bucket{") and 'model="digits"' in line:
            le = re.search(r'le="([^"]+)"', line)
            buckets.append((le.group(1) if le else "?", float(line.rsplit(" ", 1)[1])))
        elif line.startswith("maas_runner_batch_size_sum{") and 'model="digits"' in line:
            total = float(line.rsplit(" ", 1)[1])
        elif line.startswith("maas_runner_batch_size_count{") and 'model="digits"' in line:
            count = float(line.rsplit(" ", 1)[1])
    if not count:
        return "none recorded"
    cumulative = ", ".join(f"<={le}: {int(v)}" for le, v in buckets)
    return f"mean {total / count:.1f} over {int(count)} batches (cumulative {cumulative})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--http", action="store_true", help="full gateway vs the seed app over HTTP with wrk")
    ap.add_argument("--arch", default="seed-mlp", help="in-process: the architecture (random weights)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--duration", type=float, default=5)
    ap.add_argument("--warmup", type=float, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="gateway processes (2, like the seed's gunicorn -w 2)")
    ap.add_argument("--seed-pythonpath", default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    if args.http:
        http_main(args)
    else:
        inprocess_main(args)


if __name__ == "__main__":
    main()
