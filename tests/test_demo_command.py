"""`maas-gateway demo` as a user runs it: one command, a token and a curl line that work, clean exit."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from tests.harness import free_port

REQUEST = json.loads((Path(__file__).parents[1] / "deploy" / "examples" / "digits_request.json").read_text())


@pytest.mark.slow
async def test_demo_prints_a_working_token_and_exits_0_on_sigterm() -> None:
    port, admin = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "demo", "--port", str(port), "--admin-port", str(admin)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        printed = []
        deadline = time.monotonic() + 90
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            printed.append(line)
            if "curl" in line:
                break
        text = "".join(printed)
        token = re.search(r"token:\s+(\S+)", text).group(1)  # type: ignore[union-attr]
        assert f"127.0.0.1:{port}/v2/models/digits/infer" in text
        async with aiohttp.ClientSession() as s:
            for _ in range(300):
                try:
                    async with s.get(f"http://127.0.0.1:{admin}/readyz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                time.sleep(0.1)  # the poll interval of this wait on a condition, not a clock
            async with s.post(f"http://127.0.0.1:{port}/v2/models/digits/infer", json=REQUEST,
                              headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == 200, await r.text()
                body = await r.json()
            names = {o["name"] for o in body["outputs"]}
            assert "top_k_indices" in names  # the demo's output rule hardens the answer
            indices = next(o for o in body["outputs"] if o["name"] == "top_k_indices")["data"]
            assert indices[0] == 2  # the request is a real "2" from scikit-learn's digits
            async with s.post(f"http://127.0.0.1:{port}/v2/models/digits/infer", json=REQUEST) as r:
                assert r.status == 401
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
