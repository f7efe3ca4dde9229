#!/usr/bin/env python3
"""Instructions per proxied request (valgrind's callgrind), A/B between two checkouts: a number that holds still.

req/s and even CPU-µs per request move by 5-15 % between runs on a shared 2-core machine;
instruction counts of the same code on the same inputs move by well under 1 %. Each
gateway runs alone under ``valgrind --tool=callgrind`` (one process), is warmed up,
its counters are zeroed, it serves N requests (hey, 8 connections, every answer
must be 200), and the counters are dumped: instructions / requests served.

    apt-get install valgrind hey nginx-light            # once
    python bench/instructions.py --variants auth-raw,full --compare /tmp/gw-before
    python bench/instructions.py --variants auth -n 2000
    python bench/instructions.py --variants full-redis --redis redis://127.0.0.1:6379/0

Variants are bench/overhead.py's. Under callgrind a gateway starts in about a
minute and serves a few hundred requests a second: a variant takes 2-3 minutes.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

import overhead  # noqa: E402  (the upstream, configs and variants of every bench)


def hey(port: int, n: int, token: str, body: Path, *, strict: bool = True) -> int:
    """Send ``n`` requests; the number served (all must be 200: a refusal is cheaper and would flatter us).

    A binary v2 body (``--binary``) is sent with its ``Inference-Header-Content-Length``, read from the
    ``.header`` file beside it."""
    kind = ["-T", "application/json"]
    header = body.with_suffix(".header")
    if header.exists():
        kind = ["-T", "application/octet-stream", "-H", f"Inference-Header-Content-Length: {header.read_text()}"]
    out = subprocess.run(["hey", "-n", str(n), "-c", "8", "-m", "POST", "-H", f"Authorization: {token}",
                          *kind, "-D", str(body), f"http://127.0.0.1:{port}/v2/models/digits/infer"],
                         capture_output=True, check=True, text=True).stdout
    codes = re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)
    if strict and (len(codes) != 1 or codes[0][0] != "200"):
        raise SystemExit(f"not every answer was 200: {codes}")
    return int(codes[0][1])


def instructions_per_request(work: Path, name: str, variant: str, tree: Path, up_port: int, keys, token: str,
                             body: Path, n: int, redis: str | None = None) -> float:
    import yaml

    cfg = overhead.gateway_config(work, name, variant, up_port, keys, redis)
    port = overhead.free_port()
    data = yaml.safe_load(cfg.read_text())
    data["server"]["port"] = port
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    out = work / f"{name}.callgrind"
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-m",
                             "gateway", "serve", "-c", str(cfg), "--workers", "1"],
                            cwd=tree, env={**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"},
                            stdout=subprocess.DEVNULL, stderr=open(work / f"{name}.log", "w"), start_new_session=True)
    try:
        overhead.wait_port(port, 600)
        # warm-up: caches, the verified token, pooled upstream connections (under valgrind a first Redis call
        # may time out: its 503 is not counted)
        hey(port, 300, token, body, strict=False)
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], capture_output=True, check=True)
        served = hey(port, n, token, body)
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], capture_output=True, check=True)
        time.sleep(1)
        dump = max(glob.glob(f"{out}*"), key=os.path.getmtime)
        total = next(int(line.split()[1]) for line in open(dump) if line.startswith(("summary:", "totals:")))
        return total / served
    finally:
        proc.terminate()
        proc.wait(60)


def binary_body(work: Path) -> Path:
    """The reference harness's binary v2 request: a JSON header, then 784 FP32 values as raw bytes."""
    values = struct.pack("<784f", *(i / 784 for i in range(784)))
    header = json.dumps({"id": "bench", "inputs": [{"name": "input-0", "shape": [1, 784], "datatype": "FP32",
                                                     "parameters": {"binary_data_size": len(values)}}]},
                        separators=(",", ":")).encode()
    body = work / "body.bin"
    body.write_bytes(header + values)
    body.with_suffix(".header").write_text(str(len(header)))
    return body


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="auth-raw,full")
    ap.add_argument("--compare", type=Path, default=None, help="another checkout: each variant also runs from there")
    ap.add_argument("-n", type=int, default=1000, help="requests counted per variant")
    ap.add_argument("--redis", default=None, help="Redis URL for the *-redis variants (quota store and monitors)")
    ap.add_argument("--binary", action="store_true",
                    help="send the request as binary tensors (784 FP32 values, the reference harness's v2-binary body)")
    args = ap.parse_args()
    from harness import Keys

    work = Path(tempfile.mkdtemp(prefix="maas-instructions-"))
    keys = Keys(work / "idp")
    token = "Bearer " + keys.token("bench", ["inference"], ttl_s=86400)  # valgrind is slow: outlive the run
    body = work / "body.json"
    body.write_text(json.dumps(overhead.V2_BODY))
    if args.binary:
        body = binary_body(work)
        item = overhead.SCHEMA["properties"]["inputs"]["items"]  # the schema sees the JSON header: no "data"
        item["required"] = [name for name in item["required"] if name != "data"]
    up, up_port = overhead.start_upstream(work)
    trees = {"this": ROOT} | ({"base": args.compare.resolve()} if args.compare else {})
    try:
        for variant in args.variants.split(","):
            for label, tree in trees.items():
                per = instructions_per_request(work, f"{label}-{variant}", variant, tree, up_port, keys, token, body,
                                               args.n, args.redis)
                print(f"{label:5s} {variant:16s} {per / 1e3:9.1f} k instructions/request", flush=True)
    finally:
        up.terminate()


if __name__ == "__main__":
    main()
