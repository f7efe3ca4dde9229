"""The quota store on every Redis the spec names: TLS with a password from the environment, Sentinel, Cluster.

Each test starts its own redis-server processes on free ports and stops them by PID.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import pytest
import redis

from gateway.config import QuotaConfig
from gateway.errors import ConfigError
from gateway.quota.redis_connect import parse_sentinel_url
from gateway.quota.redis_store import RedisStore
from gateway.quota.store import Limits, bucket_id
from gateway.quota.stores import open_store
from tests import harness
from tests.certs import self_signed
from tests.quota_support import free_port

LIMITS = Limits(rate_per_s=0.001, burst=3, max_concurrent=2, tokens_per_minute=100)


async def exercise(store: RedisStore) -> None:
    """Exact counts across several buckets: 5 subjects x min(burst 3, 2 slots) admitted."""
    await store.start()
    async with harness.closing(store):
        results = await asyncio.gather(*(store.acquire(bucket_id("e", f"user{i % 5}", "m"), LIMITS, f"s{i}", 10)
                                          for i in range(40)))
        assert sum(v.allowed for v in results) == 10
        assert store.ready() is None
        assert store.live_slots() == 10
        # the slot refresher's call: one pipelined call, or on a Cluster one call per key to its node
        await store.refresh_slots({store.keys(bucket_id("e", f"user{i}", "m"))[1]: [f"s{i}", f"s{i + 5}"]
                                   for i in range(5)})
        assert store.ready() is None
        await store.release(bucket_id("e", "user0", "m"), LIMITS, "s0", 10)


def spawn(args: list[str], cwd: Path) -> subprocess.Popen[bytes]:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(["redis-server", *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_ping(timeout: float = 10.0, **kwargs) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if redis.Redis(host="127.0.0.1", socket_timeout=0.5, socket_connect_timeout=0.5, **kwargs).ping():
                return
        except redis.RedisError:
            time.sleep(0.05)  # the poll interval of this wait on a condition, not a clock
    raise RuntimeError(f"redis {kwargs} did not answer")


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()


async def test_tls_with_password_from_env(tmp_path: Path, monkeypatch) -> None:
    cert, key = self_signed(tmp_path, "redis", host="127.0.0.1", ca=True)
    port = free_port()
    proc = spawn(["--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--tls-cert-file", str(cert),
                  "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
                  "--requirepass", "s3cret-pw", "--save", "", "--appendonly", "no"], tmp_path / "tls")
    try:
        wait_ping(port=port, ssl=True, ssl_ca_certs=str(cert), password="s3cret-pw")
        monkeypatch.setenv("MAAS_TEST_REDIS_PW", "s3cret-pw")
        url = f"rediss://:wrong@127.0.0.1:{port}/0?ssl_ca_certs={cert}"  # the env password wins
        await exercise(open_store(QuotaConfig(store=url, password_env="MAAS_TEST_REDIS_PW", key_prefix="t:")))
        # a wrong password is a store failure (503 under deny), never a hang
        monkeypatch.setenv("MAAS_TEST_REDIS_PW", "nope")
        bad = open_store(QuotaConfig(store=url, password_env="MAAS_TEST_REDIS_PW", key_prefix="t:"))
        await bad.start()
        assert bad.ready() is not None and "nope" not in bad.ready() and "wrong" not in bad.ready()
        await bad.close()
    finally:
        stop([proc])


def test_missing_password_env_is_a_config_error(monkeypatch) -> None:
    monkeypatch.delenv("MAAS_TEST_UNSET_PW", raising=False)
    with pytest.raises(ConfigError, match="MAAS_TEST_UNSET_PW"):
        open_store(QuotaConfig(store="redis://127.0.0.1:1/0", password_env="MAAS_TEST_UNSET_PW"))


def test_sentinel_url_parsing() -> None:
    hosts, service, db, ssl, user, password = parse_sentinel_url(
        "redis+sentinel://u:p%40ss@10.0.0.1:26379,10.0.0.2:26380,[::1]:26381/mymaster/2?ssl=true")
    assert hosts == [("10.0.0.1", 26379), ("10.0.0.2", 26380), ("::1", 26381)]
    assert (service, db, ssl, user, password) == ("mymaster", 2, True, "u", "p@ss")
    for bad in ("redis+sentinel://h:1", "redis+sentinel:///svc", "redis+sentinel://h:x/svc", "redis+sentinel://h/svc/x"):
        with pytest.raises(ConfigError):
            parse_sentinel_url(bad)


@pytest.mark.slow
async def test_sentinel(tmp_path: Path) -> None:
    master, sentinel = free_port(), free_port()
    conf = tmp_path / "sentinel" / "sentinel.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text(f"port {sentinel}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {master} 1\n"
                    "sentinel down-after-milliseconds mymaster 5000\n")
    procs = [spawn(["--port", str(master), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                   tmp_path / "master")]
    try:
        wait_ping(port=master)
        procs.append(spawn([str(conf), "--sentinel"], conf.parent))
        wait_ping(port=sentinel)
        url = f"redis+sentinel://127.0.0.1:{sentinel}/mymaster/0"
        await exercise(open_store(QuotaConfig(store=url, key_prefix="s:", timeout_ms=500)))
    finally:
        stop(procs)


@pytest.mark.slow
async def test_cluster(tmp_path: Path) -> None:
    ports: list[int] = []
    while len(ports) < 3:  # the cluster bus listens on port + 10000
        p = free_port()
        if p < 55000 and p not in ports:
            ports.append(p)
    procs = [spawn(["--port", str(p), "--bind", "127.0.0.1", "--cluster-enabled", "yes", "--cluster-config-file",
                    "nodes.conf", "--save", "", "--appendonly", "no"], tmp_path / str(p)) for p in ports]
    try:
        for p in ports:
            wait_ping(port=p)
        subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 10
        while "cluster_state:ok" not in subprocess.run(["redis-cli", "-p", str(ports[0]), "cluster", "info"],
                                                       capture_output=True, text=True).stdout:
            assert time.monotonic() < deadline, "cluster never became ok"
            time.sleep(0.1)  # the poll interval of this wait on a condition, not a clock
        store = open_store(QuotaConfig(store=f"redis://127.0.0.1:{ports[0]}/0", cluster=True, key_prefix="c:",
                                       timeout_ms=1000))
        await exercise(store)
    finally:
        stop(procs)
