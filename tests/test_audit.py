"""The audit log's hash chain: any edit, deletion or reordering is found and named by line."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import orjson

from gateway.audit import GENESIS, AuditLog, verify


async def write_lines(path: Path, n: int) -> None:
    log = AuditLog(path)
    await log.start()
    for i in range(n):
        log.write({"request_id": f"r{i}", "status": 200})
    await log.close()


async def test_chain_links_each_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    await write_lines(path, 3)
    lines = path.read_bytes().splitlines()
    assert orjson.loads(lines[0])["prev"] == GENESIS
    assert orjson.loads(lines[1])["prev"] == hashlib.sha256(lines[0]).hexdigest()
    assert verify(path) == (3, None, "ok")


async def test_chain_continues_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    await write_lines(path, 2)
    await write_lines(path, 2)
    assert verify(path)[1] is None


async def test_edit_is_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    await write_lines(path, 5)
    lines = path.read_bytes().splitlines()
    lines[2] = lines[2].replace(b'"status":200', b'"status":403')
    path.write_bytes(b"\n".join(lines) + b"\n")
    assert verify(path)[1] == 4  # line 3 changed, so line 4's prev no longer matches


async def test_deleted_and_reordered_lines_are_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    await write_lines(path, 5)
    lines = path.read_bytes().splitlines()
    path.write_bytes(b"\n".join(lines[:1] + lines[2:]) + b"\n")
    assert verify(path)[1] == 2
    path.write_bytes(b"\n".join([lines[0], lines[2], lines[1]] + lines[3:]) + b"\n")
    assert verify(path)[1] == 2
    path.write_bytes(b"\n".join(lines[1:]) + b"\n")
    assert verify(path)[1] == 1


async def test_cli_verify_exit_codes(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    await write_lines(path, 3)
    ok = subprocess.run([sys.executable, "-m", "gateway", "audit", "verify", str(path)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    data = path.read_bytes().replace(b"r1", b"rX")
    path.write_bytes(data)
    bad = subprocess.run([sys.executable, "-m", "gateway", "audit", "verify", str(path)], capture_output=True, text=True)
    assert bad.returncode == 1 and ":3:" in bad.stdout
