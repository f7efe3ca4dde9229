"""Issue 14, budgets that count what leaks: cost: rows, per_day, per_month; memory and Redis alike."""

from __future__ import annotations

import datetime
import math
import time
from typing import Any, AsyncIterator

import pytest
import redis as sync_redis

from gateway.config import QuotaConfig
from gateway.errors import RateLimited
from gateway.metrics import Metrics
from gateway.policy.document import QuotaRule
from gateway.quota.memory_store import MemoryStore, calendar
from gateway.quota.redis_store import RedisStore
from gateway.quota.store import Limits
from gateway.stages.quota import Quota
from tests.quota_support import Policy, context, delete_prefix, document, redis_up, unique_prefix


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[Any]:
    if request.param == "memory":
        yield MemoryStore()
        return
    if not redis_up(redis_url):
        pytest.skip("no Redis")
    prefix = unique_prefix()
    s = RedisStore(QuotaConfig(store=redis_url, key_prefix=prefix, timeout_ms=2000))
    await s.start()
    try:
        yield s
    finally:
        await s.close()
        delete_prefix(redis_url, prefix)


def v2_body(rows: int) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": [rows, 64], "data": [0.0] * (rows * 64)}]}


def stage_with(store: Any, rule: QuotaRule) -> Quota:
    return Quota(QuotaConfig(), Metrics(), Policy(document(rule)), store)


async def test_a_4096_row_request_costs_4096(store: Any) -> None:
    quota = stage_with(store, QuotaRule(models=["digits"], cost="rows", rate_per_s=0.001, burst=10_000))
    ctx = context(body=v2_body(4096))
    await quota(ctx)
    assert ctx.quota == "ok" and ctx.response_headers["RateLimit-Remaining"] == str(10_000 - 4096)
    await quota(context(body=v2_body(4096)))
    with pytest.raises(RateLimited):  # 1808 rows left: a third 4096-row request is refused
        await quota(context(body=v2_body(4096)))
    small = context(body=v2_body(1000))
    await quota(small)
    assert small.response_headers["RateLimit-Remaining"] == str(10_000 - 2 * 4096 - 1000)


async def test_more_rows_than_the_burst_is_never_admitted(store: Any) -> None:
    quota = stage_with(store, QuotaRule(models=["digits"], cost="rows", rate_per_s=100, burst=64))
    with pytest.raises(RateLimited):
        await quota(context(body=v2_body(65)))
    await quota(context(body=v2_body(64)))


async def test_request_cost_is_still_one_per_request(store: Any) -> None:
    quota = stage_with(store, QuotaRule(models=["digits"], rate_per_s=0.001, burst=3))
    ctx = context(body=v2_body(4096))
    await quota(ctx)
    assert ctx.response_headers["RateLimit-Remaining"] == "2"


def seconds_to_midnight() -> float:
    now = time.time()
    return (math.floor(now / 86400) + 1) * 86400 - now


async def test_per_day_refuses_with_retry_after_to_midnight_utc(store: Any) -> None:
    quota = stage_with(store, QuotaRule(models=["digits"], cost="rows", per_day=100))
    ok = context(body=v2_body(60))
    await quota(ok)
    assert ok.response_headers["RateLimit-Limit"] == "100" and ok.response_headers["RateLimit-Remaining"] == "40"
    with pytest.raises(RateLimited) as refused:
        await quota(context(body=v2_body(41)))
    expected = seconds_to_midnight()
    retry = int(refused.value.headers["Retry-After"])
    assert expected - 2 <= retry <= expected + 2, (retry, expected)
    headers = refused.value.headers
    assert headers["RateLimit-Limit"] == "100" and headers["RateLimit-Remaining"] == "40"
    assert abs(int(headers["RateLimit-Reset"]) - expected) <= 2
    await quota(context(body=v2_body(40)))  # exactly what is left still fits


async def test_per_month_counts_with_the_rate_limit_and_describes_the_refusing_limit(store: Any) -> None:
    quota = stage_with(store, QuotaRule(models=["digits"], rate_per_s=1000, burst=1000, per_month=3))
    for _ in range(3):
        ctx = context(body=v2_body(1))
        await quota(ctx)
        assert ctx.response_headers["RateLimit-Limit"] == "1000"  # admitted: the headline (rate) limit
    with pytest.raises(RateLimited) as refused:
        await quota(context(body=v2_body(1)))
    assert refused.value.headers["RateLimit-Limit"] == "3" and refused.value.headers["RateLimit-Remaining"] == "0"
    now = datetime.datetime.now(datetime.timezone.utc)
    first = datetime.datetime(now.year + (now.month == 12), now.month % 12 + 1, 1, tzinfo=datetime.timezone.utc)
    assert abs(int(refused.value.headers["Retry-After"]) - (first - now).total_seconds()) <= 2


async def test_refused_by_the_day_takes_nothing_from_the_bucket(store: Any) -> None:
    limits = Limits(rate_per_s=0.001, burst=10, per_day=5, rows=True)
    assert (await store.acquire("e:a:m", limits, "", 0, 5)).allowed
    refused = await store.acquire("e:a:m", limits, "", 0, 1)
    assert not refused.allowed and refused.reason == "day"
    other = Limits(rate_per_s=0.001, burst=10, rows=True)  # same bucket: 5 rows were taken, not 6
    assert (await store.acquire("e:a:m", other, "", 0, 1)).remaining == 4


@pytest.mark.parametrize("when", ["2026-12-31T23:59:59", "2027-02-28T12:00:00", "2028-02-29T00:00:00",
                                  "2026-01-31T00:00:00", "1999-12-31T23:00:00"])
def test_calendar_windows(when: str) -> None:
    t = datetime.datetime.fromisoformat(when).replace(tzinfo=datetime.timezone.utc)
    today, day_end, month_id, month_end = calendar(t.timestamp() * 1000)
    assert day_end / 1000 == (t.replace(hour=0, minute=0, second=0) + datetime.timedelta(days=1)).timestamp()
    assert month_id == t.year * 12 + t.month - 1
    nxt = datetime.datetime(t.year + (t.month == 12), t.month % 12 + 1, 1, tzinfo=datetime.timezone.utc)
    assert month_end / 1000 == nxt.timestamp()


def test_lua_calendar_matches_python(redis_url: str) -> None:
    """The script's month arithmetic (Hinnant's algorithm in Lua 5.1) against Python's, over 60 years."""
    if not redis_up(redis_url):
        pytest.skip("no Redis")
    from gateway.quota.redis_scripts import ACQUIRE

    source = ACQUIRE.source
    start, end = source.index("local function civil"), source.index("local today")
    probe = source[start:end] + """
local out = {}
for i = 1, #ARGV do
  local d = tonumber(ARGV[i])
  local y, m = civil(d)
  local ny, nm = y, m + 1
  if m == 12 then ny, nm = y + 1, 1 end
  out[i] = string.format('%d,%d,%d', y, m, days(ny, nm))
end
return table.concat(out, ';')
"""
    client = sync_redis.Redis.from_url(redis_url)
    samples = list(range(0, 60 * 366, 17)) + [20454, 20453, 18321, 11016]
    reply = client.eval(probe, 0, *samples).decode().split(";")
    for day, got in zip(samples, reply):
        t = datetime.date(1970, 1, 1) + datetime.timedelta(days=day)
        nxt = datetime.date(t.year + (t.month == 12), t.month % 12 + 1, 1)
        assert got == f"{t.year},{t.month},{(nxt - datetime.date(1970, 1, 1)).days}", day


# ---- over HTTP: request.params in deny rules, a rows budget, the per-day Retry-After

HTTP_POLICY: dict[str, Any] = {
    "roles": {"partner": []},
    "rules": [
        {"id": "partners", "roles": ["partner"], "models": ["*"], "actions": ["infer"], "effect": "allow"},
        {"id": "no-logprobs", "roles": ["*"], "models": ["chat"], "actions": ["infer"], "effect": "deny",
         "when": "request.params.logprobs or request.params.logit_bias"},
        {"id": "small-batches", "roles": ["*"], "models": ["digits"], "actions": ["infer"], "effect": "deny",
         "when": "request.params.batch > 4"},
    ],
    "quotas": [{"id": "rows", "roles": ["partner"], "models": ["digits"], "cost": "rows", "per_day": 6}],
    "outputs": [{"roles": ["partner"], "models": ["digits"], "label_only": True}],
}


async def test_params_rules_and_row_budget_over_http(tmp_path: Any, keys: Any) -> None:
    import aiohttp

    from tests import harness

    def rows(n: int) -> dict[str, Any]:
        return {"inputs": [{"name": "input", "datatype": "FP32", "shape": [n, 1], "data": [[0.5]] * n}]}

    async with harness.upstream() as up:
        models = {"digits": harness.v2_model(up.url), "chat": harness.openai_model(up.url)}
        async with harness.gateway(tmp_path, keys, models=models, policy=HTTP_POLICY, quota={"store": "memory"}) as gw:
            auth = keys.auth("acme", ["partner"])
            async with aiohttp.ClientSession() as s:
                chat = gw.url + "/v1/chat/completions"
                message = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
                assert (await s.post(chat, json=message, headers=auth)).status == 200
                assert (await s.post(chat, json={**message, "logprobs": True}, headers=auth)).status == 403
                assert (await s.post(chat, json={**message, "logit_bias": {"1": 5}}, headers=auth)).status == 403
                infer = gw.url + "/v2/models/digits/infer"
                assert (await s.post(infer, json=rows(5), headers=auth)).status == 403  # batch > 4
                r = await s.post(infer, json=rows(4), headers=auth)
                assert r.status == 200 and r.headers["RateLimit-Remaining"] == "2"
                assert [o["name"] for o in (await r.json())["outputs"]] == ["top_k_indices"]
                r = await s.post(infer, json=rows(3), headers=auth)
                assert r.status == 429
                assert abs(int(r.headers["Retry-After"]) - seconds_to_midnight()) <= 2
                assert r.headers["RateLimit-Limit"] == "6" and r.headers["RateLimit-Remaining"] == "2"
                assert (await s.post(infer, json=rows(2), headers=auth)).status == 200
    assert len([x for x in up.seen if x.path.endswith("/infer")]) == 2  # refused requests never reached the model


def test_check_reports_noise_without_a_key(tmp_path: Any, keys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.check import policy_findings
    from gateway.config import load_config
    from tests import harness

    policy = {"rules": [], "outputs": [{"models": ["digits"], "noise_epsilon": 1}]}
    models = {"digits": harness.v2_model("http://127.0.0.1:9")}
    path = harness.write_yaml(tmp_path / "g.yaml", harness.gateway_config(tmp_path, keys, models=models, policy=policy))
    found = [f for f in policy_findings(load_config(path)) if f.where == "hardening.noise_key_env"]
    assert found and found[0].severity == "medium" and "per-process key" in found[0].message
    monkeypatch.setenv("MAAS_TEST_NOISE_KEY2", "k" * 32)
    config = harness.gateway_config(tmp_path, keys, models=models, policy=policy,
                                    hardening={"noise_key_env": "MAAS_TEST_NOISE_KEY2"})
    path = harness.write_yaml(tmp_path / "g2.yaml", config)
    assert not [f for f in policy_findings(load_config(path)) if f.where == "hardening.noise_key_env"]
