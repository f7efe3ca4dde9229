#!/usr/bin/env python3
"""Gateway overhead on loopback: direct-to-upstream vs through maas-gateway, side by side in one run.

Starts a fast upstream (nginx returning a fixed v2 answer; an aiohttp fallback
if nginx is missing), then one gateway per *variant* (which pipeline stages are
on), and drives each with wrk at 16 and 64 connections, interleaved in rounds
so machine noise hits every target alike. Prints req/s, p50 and p99 per target
and each target's ratio to `direct` measured in the same round.

    apt-get install wrk nginx-light      # once
    python bench/overhead.py                                   # auth vs full pipeline
    python bench/overhead.py --variants auth,auth+policy,full --rounds 3 --duration 10
    python bench/overhead.py --variants full,full-novalidate --workers 2
    python bench/overhead.py --variants auth,quota-redis --redis redis://127.0.0.1:6379/0
    python bench/overhead.py --compare /tmp/gw-before   # also run each variant from another checkout (A/B)
    python bench/overhead.py --variants auth --floors    # and the no-logic proxies: the stack's own cost

Variants: auth (JWT + a one-rule policy, v2 protocol: the body is parsed and
checked), auth-raw (the same, but the model is a `raw` backend: the v2 path is
forwarded as is, no body parsing: the gateway-core cost), auth+policy
(the example-like policy with ABAC rules), full (policy + memory quota +
schema validation + audit), full-redis (quota in Redis), full-novalidate,
quota-redis (auth+policy+Redis quota only), quota-off (auth+policy only),
hardened (full + label-only outputs), rowcounted (hardened + `cost: rows`, per_day and
per_month) and monitored (rowcounted + a low_confidence monitor with a deny-on-alarm rule):
issue 14's "a monitored, row-counted model within 10 % of the same model without monitor"
is monitored against rowcounted (`-redis`: quota store and monitors in Redis):

    python bench/overhead.py --variants rowcounted,monitored --rounds 3
    python bench/overhead.py --variants rowcounted-redis,monitored-redis --redis redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

V2_BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [round(i / 64, 4) for i in range(64)]}]}
V2_ANSWER = '{"model_name":"digits","outputs":[{"name":"scores","datatype":"FP32","shape":[1,10],"data":[0.01,0.02,0.6,0.05,0.1,0.02,0.05,0.05,0.05,0.05]}]}'
WRK_LUA = r"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = assert(io.open(os.getenv("BODY_FILE"), "rb")); wrk.body = f:read("*a"); f:close()
local auth = os.getenv("AUTH"); if auth and auth ~= "" then wrk.headers["Authorization"] = auth end
function done(summary, latency, requests)
  io.write(string.format('BENCHJSON {"requests":%d,"duration_us":%d,"non2xx":%d,"errors":%d,"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""
SCHEMA = {"type": "object", "required": ["inputs"], "properties": {"inputs": {"type": "array", "minItems": 1, "items": {
    "type": "object", "required": ["name", "datatype", "shape", "data"],
    "properties": {"name": {"type": "string"}, "datatype": {"enum": ["FP32"]},
                   "shape": {"type": "array", "items": {"type": "integer"}}, "data": {"type": "array"}}}}}}
POLICY_SIMPLE = {"roles": {"inference": []}, "rules": [
    {"id": "inference-digits", "roles": ["inference"], "models": ["digits"], "actions": ["infer", "read"], "effect": "allow"}]}
POLICY_FULL = {
    "roles": {"inference": [], "analyst": ["inference"], "admin": ["analyst"]},
    "rules": [
        {"id": "inference-digits", "roles": ["inference"], "models": ["digits", "sentiment-*"], "actions": ["infer", "read"], "effect": "allow"},
        {"id": "finance-clearance", "roles": ["analyst"], "models": ["finance-*"], "actions": ["infer"], "effect": "allow",
         "when": "subject.clearance >= 3 and request.mtls"},
        {"id": "contractors-office-hours", "roles": ["*"], "models": ["*"], "actions": ["*"], "effect": "deny",
         "when": "subject has employment and subject.employment == 'contractor' and (request.hour < 0)"},
        {"id": "blocked-subjects", "roles": ["*"], "models": ["*"], "actions": ["*"], "effect": "deny",
         "when": "subject.sub in ['mallory', 'eve']"},
    ],
}
QUOTA = [{"roles": ["inference"], "models": ["*"], "rate_per_s": 1_000_000, "burst": 1_000_000}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listening on {port} after {timeout}s")


def start_upstream(work: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if os.path.exists(nginx):
        (work / "nginx").mkdir()
        conf = work / "nginx" / "nginx.conf"
        conf.write_text(f"""
worker_processes 1; daemon off; pid {work}/nginx/nginx.pid; error_log {work}/nginx/error.log;
events {{ worker_connections 4096; }}
http {{ access_log off; client_body_temp_path {work}/nginx; proxy_temp_path {work}/nginx;
  fastcgi_temp_path {work}/nginx; uwsgi_temp_path {work}/nginx; scgi_temp_path {work}/nginx;
  keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{port}; client_max_body_size 10m;
    location / {{ default_type application/json; return 200 '{V2_ANSWER}'; }} }} }}
""")
        proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(work / "nginx")], start_new_session=True)
    else:
        code = f"""
from aiohttp import web
async def h(r):
    await r.read(); return web.Response(text={V2_ANSWER!r}, content_type='application/json')
app = web.Application(); app.router.add_route('*', '/{{t:.*}}', h)
web.run_app(app, host='127.0.0.1', port={port}, access_log=None, print=None)
"""
        proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    wait_port(port)
    return proc, port


def gateway_config(work: Path, name: str, variant: str, upstream_port: int, keys, redis: str | None) -> Path:
    import yaml

    d = work / name
    d.mkdir()
    policy = POLICY_SIMPLE if variant in ("auth", "auth-raw") else POLICY_FULL
    policy = dict(policy)
    config: dict = {
        "server": {"host": "127.0.0.1", "port": 0, "upstream_timeout_s": 10},
        "admin": None,
        "auth": {"jwt": keys.jwt_config()},
        "policy": {"file": str(d / "policy.yaml"), "watch": False},
        "models": {"digits": {"backend": {"type": "http", "protocol": "v2",
                                          "upstreams": [f"http://127.0.0.1:{upstream_port}"]}}},
    }
    if variant == "auth-raw":
        config["models"]["digits"]["backend"].update(protocol="raw", paths=["/v2/models/digits/infer"])
    if variant.startswith(("full", "hardened", "rowcounted", "monitored")):
        config["audit"] = {"file": str(d / "audit.log")}
        if variant != "full-novalidate":
            (d / "schema.json").write_text(json.dumps(SCHEMA))
            config["models"]["digits"]["schema"] = str(d / "schema.json")
    if variant in ("full", "full-novalidate", "full-redis", "quota-redis") or variant.startswith(
            ("hardened", "rowcounted", "monitored")):
        policy["quotas"] = QUOTA
        store = redis if variant.endswith("-redis") else "memory"
        if store is None:
            raise SystemExit(f"variant {variant} needs --redis URL")
        config["quota"] = {"store": store, "on_store_error": "deny", "key_prefix": f"bench{os.getpid()}:"}
    if variant.startswith(("hardened", "rowcounted", "monitored")):  # issue 14: label-only answers
        policy["outputs"] = [{"roles": ["inference"], "models": ["digits"], "label_only": True}]
    if variant.startswith(("rowcounted", "monitored")):  # rows and calendar totals (no leases: every request counts)
        policy["quotas"] = [{**QUOTA[0], "cost": "rows", "per_day": 10**12, "per_month": 10**13}]
    if variant.startswith("monitored"):
        policy["monitors"] = [{"id": "lc", "roles": ["inference"], "models": ["digits"], "signal": "low_confidence",
                               "threshold": 0.5, "window": 50, "alarm_rate": 0.3}]  # the canned answer is confident
        policy["rules"] = [*policy["rules"], {"id": "cut-off", "roles": ["*"], "models": ["digits"],
                                              "actions": ["infer"], "effect": "deny", "when": "monitor.lc"}]
    (d / "policy.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))
    path = d / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_gateway(config: Path, workers: int, root: Path = ROOT) -> tuple[subprocess.Popen, int]:
    import yaml

    port = free_port()
    data = yaml.safe_load(config.read_text())
    data["server"]["port"] = port
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "-c", str(config), "--workers", str(workers)],
                            cwd=root, start_new_session=True, stdout=subprocess.DEVNULL, stderr=open(config.with_suffix(".log"), "w"))
    wait_port(port)
    return proc, port


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) used so far by every process in a process group (a gateway and its workers).

    CPU per request is steadier than req/s on a shared machine: other people's load
    slows the clock we measure against, much less the work each request costs."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after "(comm)": state ppid pgrp ... utime(11) stime(12)
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def run_wrk(port: int, conns: int, duration: float, lua: Path, body: Path, auth: str) -> dict:
    return run_wrk_url(f"http://127.0.0.1:{port}/v2/models/digits/infer", conns, duration, lua, body, auth)


def run_wrk_url(url: str, conns: int, duration: float, lua: Path, body: Path, auth: str) -> dict:
    """One wrk run of ``lua`` (POST ``body``) against ``url``: its BENCHJSON summary plus ``rps``."""
    env = {**os.environ, "BODY_FILE": str(body), "AUTH": auth}
    cmd = ["wrk", "-t2", f"-c{conns}", f"-d{max(1, int(round(duration)))}s", "--timeout", "5s", "-s", str(lua), url]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=duration + 60).stdout
    m = re.search(r"BENCHJSON (\{.*\})", out)
    if not m:
        raise SystemExit(f"wrk printed no summary:\n{out}")
    r = json.loads(m.group(1))
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="auth,full")
    ap.add_argument("--conns", default="16,64")
    ap.add_argument("--duration", type=float, default=8)
    ap.add_argument("--warmup", type=float, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--redis", default=None)
    ap.add_argument("--floors", action="store_true",
                    help="also run the no-logic proxies (bench/bare_aiohttp_proxy.py, bench/bare_client_proxy.py)")
    ap.add_argument("--compare", type=Path, default=None,
                    help="another checkout of maas-gateway: each variant also runs from there (named base-VARIANT)")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk not found: apt-get install wrk")
    from harness import Keys

    work = Path(tempfile.mkdtemp(prefix="maas-bench-"))
    keys = Keys(work / "idp")
    token = "Bearer " + keys.token("bench", ["inference"])
    body = work / "body.json"
    body.write_text(json.dumps(V2_BODY))
    lua = work / "post.lua"
    lua.write_text(WRK_LUA)
    procs: list[subprocess.Popen] = []
    try:
        up, up_port = start_upstream(work)
        procs.append(up)
        targets = {"direct": up_port}
        pgids = {"direct": up.pid}  # every target runs in its own session: pgid == the started pid
        for v in args.variants.split(","):
            proc, port = start_gateway(gateway_config(work, v, v, up_port, keys, args.redis), args.workers)
            procs.append(proc)
            targets[f"gw-{v}"] = port
            pgids[f"gw-{v}"] = proc.pid
            if args.compare is not None:  # same config, other code: an A/B in one run, under the same noise
                proc, port = start_gateway(gateway_config(work, f"base-{v}", v, up_port, keys, args.redis),
                                           args.workers, args.compare.resolve())
                procs.append(proc)
                targets[f"base-{v}"] = port
                pgids[f"base-{v}"] = proc.pid
        if args.floors:  # what the stack costs with no gateway logic: aiohttp's client vs ours
            for name in ("bare_aiohttp_proxy", "bare_client_proxy"):
                port = free_port()
                proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / f"{name}.py"),
                                         f"http://127.0.0.1:{up_port}", str(port)], start_new_session=True)
                procs.append(proc)
                wait_port(port)
                targets[name] = port
                pgids[name] = proc.pid
        conns = [int(c) for c in args.conns.split(",")]
        results: dict[tuple[str, int], list[dict]] = {}
        for rnd in range(args.rounds):
            for c in conns:
                direct_rps = None
                for name, port in targets.items():
                    run_wrk(port, c, args.warmup, lua, body, token)
                    cpu0 = group_cpu_s(pgids[name])
                    r = run_wrk(port, c, args.duration, lua, body, token)
                    r["cpu_us"] = (group_cpu_s(pgids[name]) - cpu0) / max(1, r["requests"]) * 1e6
                    if name == "direct":
                        direct_rps = r["rps"]
                    r["ratio"] = r["rps"] / direct_rps if direct_rps else float("nan")
                    results.setdefault((name, c), []).append(r)
                    print(f"round {rnd + 1} c={c:3d} {name:22s} {r['rps']:9.0f} req/s  p50 {r['p50_us'] / 1000:6.2f} ms"
                          f"  p99 {r['p99_us'] / 1000:6.2f} ms  x direct {r['ratio']:.3f}  cpu {r['cpu_us']:6.1f} us/req"
                          f"  non2xx {r['non2xx']} err {r['errors']}",
                          flush=True)
        print(f"\nmedians over {args.rounds} round(s), workers={args.workers}, duration {args.duration}s")
        print(f"{'target':24s} {'conns':>5s} {'req/s':>9s} {'p50 ms':>7s} {'p99 ms':>7s} {'x direct':>8s} {'cpu us/req':>10s}")
        med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        for (name, c), rs in sorted(results.items(), key=lambda kv: (kv[0][1], list(targets).index(kv[0][0]))):
            print(f"{name:24s} {c:5d} {med([r['rps'] for r in rs]):9.0f} {med([r['p50_us'] for r in rs]) / 1000:7.2f}"
                  f" {med([r['p99_us'] for r in rs]) / 1000:7.2f} {med([r['ratio'] for r in rs]):8.3f}"
                  f" {med([r['cpu_us'] for r in rs]):10.1f}")
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
