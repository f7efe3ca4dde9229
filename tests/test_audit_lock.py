"""One writer per audit file: a second one, in this process or another, is refused with one line naming the file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests import harness
from tests.audit_support import write_lines
from gateway.audit import AuditLog, verify
from gateway.errors import ConfigError
from tests.harness import ALLOW_ANALYSTS, Keys, free_port, gateway_config, v2_model, write_yaml


async def test_second_writer_in_process_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    first = AuditLog(path)
    with pytest.raises(ConfigError, match=f"audit log {path} is already being written by another process"):
        AuditLog(path)
    await first.close()
    await write_lines(path, 1)  # released on close
    assert verify(path)[1] is None


def test_an_unclosed_log_releases_its_lock_when_dropped(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    del log
    AuditLog(path)  # no error: the finaliser closed the descriptor


async def test_second_gateway_process_refuses_to_start(tmp_path: Path, keys: Keys) -> None:
    async with (harness.upstream() as up,
                harness.gateway(tmp_path, keys, models={"digits": v2_model(up.url)}, policy=ALLOW_ANALYSTS) as gw):
        second = tmp_path / "second"
        second.mkdir()
        config = gateway_config(second, keys, models={"digits": v2_model(up.url)}, policy=ALLOW_ANALYSTS,
                                server={"port": free_port()}, admin={"port": free_port()},
                                audit={"file": str(tmp_path / "audit.log")})  # the running gateway's file
        path = write_yaml(second / "gateway.yaml", config)
        proc = subprocess.run([sys.executable, "-m", "gateway", "serve", "-c", str(path)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert errors == [f"error: audit log {tmp_path / 'audit.log'} is already being written by another process "
                          "(one writer per file)"], proc.stderr
        assert "Traceback" not in proc.stderr


def test_a_writer_in_another_process_blocks_this_one(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from gateway.audit import AuditLog; "
         "log = AuditLog(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)", str(path)],  # holds the lock until killed
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match="already being written by another process"):
            AuditLog(path)
    finally:
        holder.kill()
        holder.wait()
    AuditLog(path)  # the kernel dropped the dead holder's lock
