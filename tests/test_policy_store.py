"""PolicyStore: start-up load, hot reload by file watch and by reload(), atomic swap, last-good on errors."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
import yaml

from gateway.config import PolicyConfig
from gateway.errors import ConfigError
from gateway.metrics import Metrics
from gateway.policy.store import PolicyStore
from tests.harness import eventually

OPEN = {"rules": [{"id": "analysts-all", "roles": ["analyst"], "effect": "allow"}]}
STRICT = {"rules": [{"id": "analysts-all", "roles": ["analyst"], "effect": "allow"},
                    {"id": "lockdown", "roles": ["*"], "models": ["digits"], "effect": "deny"}]}


def replace(path: Path, text: str) -> None:
    """Write the way editors and config tools do: a new file renamed over the old one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def allowed(store: PolicyStore, model: str = "digits") -> bool:
    current = store.current
    assert current is not None
    return current.enforcer.decide(subject="u", roles=("analyst",), claims={"sub": "u", "roles": ["analyst"]},
                                   model=model, labels={}, action="infer", request={}).allowed


def count(metrics: Metrics, result: str) -> float:
    return metrics.policy_reloads.labels(result=result)._value.get()


async def wait_for(predicate, timeout: float = 2.0) -> float:
    start = time.monotonic()
    await eventually(predicate, timeout, interval=0.02, message="condition not reached in time")
    return time.monotonic() - start


def store_for(tmp_path: Path, policy: dict | str, *, watch: bool = False) -> tuple[PolicyStore, Metrics, Path]:
    path = tmp_path / "policy.yaml"
    path.write_text(policy if isinstance(policy, str) else yaml.safe_dump(policy))
    metrics = Metrics()
    config = PolicyConfig(file=path, watch=watch, watch_interval_s=0.1, decision_cache_size=100)
    return PolicyStore(config, metrics), metrics, path


async def test_start_loads_and_reports_ready(tmp_path: Path) -> None:
    store, metrics, _ = store_for(tmp_path, OPEN)
    assert store.ready() == "policy not loaded" and store.document is None
    await store.start()
    assert store.ready() is None
    assert store.document is not None and store.document.rules[0].id == "analysts-all"
    assert metrics.policy_loaded._value.get() == 1
    assert allowed(store)
    await store.close()


async def test_bad_file_at_start_up_is_a_config_error(tmp_path: Path) -> None:
    store, _, path = store_for(tmp_path, "rules:\n  - {id: x, effect: allow, when: 'subject.a('}\n")
    with pytest.raises(ConfigError, match=f"^{path}:2: "):
        await store.start()
    assert store.current is None and store.ready() == "policy not loaded"


async def test_reload_swaps_to_a_new_policy_with_a_fresh_cache(tmp_path: Path) -> None:
    store, metrics, path = store_for(tmp_path, OPEN)
    await store.start()
    assert allowed(store)
    before = store.current
    replace(path, yaml.safe_dump(STRICT))
    assert await store.reload() is True
    assert store.current is not before and len(store.current.enforcer.cache) == 0
    assert not allowed(store) and allowed(store, "other")
    assert count(metrics, "ok") == 1
    await store.close()


async def test_broken_reload_keeps_the_last_good_policy(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store, metrics, path = store_for(tmp_path, OPEN)
    await store.start()
    good = store.current
    path.write_text("rules:\n  - id: x\n    effect: allow\n    actions: [fly]\n")
    assert await store.reload() is False
    assert store.current is good and allowed(store)
    assert store.ready() is None  # /readyz stays green
    assert count(metrics, "error") == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and f"{path}:2: " in errors[0] and "unknown action 'fly'" in errors[0]
    assert "\n" not in errors[0]
    await store.close()


async def test_watch_picks_up_a_stricter_policy_within_two_seconds(tmp_path: Path) -> None:
    store, metrics, path = store_for(tmp_path, OPEN, watch=True)
    await store.start()
    assert allowed(store)
    replace(path, yaml.safe_dump(STRICT))
    took = await wait_for(lambda: not allowed(store), timeout=2.0)
    assert took < 2.0 and count(metrics, "ok") == 1
    # a broken file: refused, counted, and the stricter policy stays in force
    replace(path, "rules: [")
    await wait_for(lambda: count(metrics, "error") == 1)
    assert not allowed(store) and allowed(store, "other")
    await asyncio.sleep(0.3)  # a window for retries that must not come (nothing to wait on)
    assert count(metrics, "error") == 1  # an unchanged broken file is not retried in a loop
    # fixed again, edited in place this time
    path.write_text(yaml.safe_dump(OPEN))
    await wait_for(lambda: allowed(store))
    await store.close()


async def test_watch_survives_the_file_disappearing(tmp_path: Path) -> None:
    store, metrics, path = store_for(tmp_path, OPEN, watch=True)
    await store.start()
    path.unlink()
    await wait_for(lambda: count(metrics, "error") == 1)
    assert allowed(store)
    replace(path, yaml.safe_dump(STRICT))
    await wait_for(lambda: not allowed(store))
    await store.close()


async def test_close_stops_watching(tmp_path: Path) -> None:
    store, metrics, path = store_for(tmp_path, OPEN, watch=True)
    await store.start()
    await store.close()
    replace(path, yaml.safe_dump(STRICT))
    await asyncio.sleep(0.4)  # a window for a reload that must not come (nothing to wait on)
    assert allowed(store) and count(metrics, "ok") == 0


async def test_concurrent_reloads_do_not_interleave(tmp_path: Path) -> None:
    store, metrics, path = store_for(tmp_path, OPEN)
    await store.start()
    replace(path, yaml.safe_dump(STRICT))
    results = await asyncio.gather(*(store.reload() for _ in range(5)))
    assert all(results) and count(metrics, "ok") == 5 and not allowed(store)
    await store.close()
