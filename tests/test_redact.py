"""No credential form of a Redis URL is ever printed: /readyz, logs, `check`, error messages."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from gateway.quota import StoreError
from gateway.quota.redis_connect import redact
from gateway.redact import redact_text, redact_url
from tests import harness
from tests.harness import ALLOW_ANALYSTS, Keys, gateway_config, v2_model, write_yaml

SECRET = "s3cret"


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://user:s3cret@10.0.0.5:6379/0", "redis://***@10.0.0.5:6379/0"),
    ("redis://:s3cret@10.0.0.5/0", "redis://***@10.0.0.5/0"),
    ("redis://10.0.0.5:6379/0?password=s3cret", "redis://10.0.0.5:6379/0?password=***"),
    ("redis://10.0.0.5/0?db=1&password=s3cret&ssl_cert_reqs=none",
     "redis://10.0.0.5/0?db=1&password=***&ssl_cert_reqs=none"),
    ("redis://10.0.0.5/0?username=s3cret&password=s3cret", "redis://10.0.0.5/0?username=***&password=***"),
    ("redis://10.0.0.5/0?pass%77ord=s3cret", "redis://10.0.0.5/0?pass%77ord=***"),  # redis-py decodes the key
    ("redis+sentinel://u:s3cret@s1:26379,s2:26379,[::1]:26380/mymaster/0?ssl=true",
     "redis+sentinel://***@s1:26379,s2:26379,[::1]:26380/mymaster/0?ssl=true"),
    ("redis+sentinel://s1:26379,s2:26379/mymaster?sentinel_password=s3cret",
     "redis+sentinel://s1:26379,s2:26379/mymaster?sentinel_password=***"),
    ("rediss://default:s3cret@cache.example:6380/2", "rediss://***@cache.example:6380/2"),
    ("unix:///run/redis.sock?db=0&password=s3cret", "unix:///run/redis.sock?db=0&password=***"),
    ("unix://s3cret:s3cret@/run/redis.sock", "unix://***@/run/redis.sock"),
    # unescaped "/", "#" and "@" inside a password: urlsplit would put its tail in the path
    ("redis://:s3/cr#et@x@10.0.0.5/0", "redis://***@10.0.0.5/0"),
])
def test_every_credential_form_is_masked(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert redact(url) == shown  # the quota store's name for the same helper
    assert SECRET not in redact_url(url) and "s3/cr" not in redact_url(url)


@pytest.mark.parametrize("plain", ["memory", "redis://127.0.0.1:6379/0", "/var/lib/witness", "rediss://h:6380?ssl=true"])
def test_urls_without_credentials_are_unchanged(plain: str) -> None:
    assert redact_url(plain) == plain


def test_urls_quoted_in_messages_are_masked() -> None:
    message = "ConnectionError: Error connecting to redis://u:s3cret@h:1/0?password=s3cret (refused); see 'unix://:s3cret@/s'"
    shown = redact_text(message)
    assert SECRET not in shown
    assert "redis://***@h:1/0?password=***" in shown and "unix://***@/s" in shown
    # a value a message cut short may have lost the "@" that marks its credentials
    assert SECRET not in redact_text("expected str, got ['redis://user:s3cretpassword...")
    assert redact_text("no url here: password=s3cret") == "no url here: password=s3cret"  # only URLs are rewritten


@pytest.mark.parametrize("store", ["redis://127.0.0.1:1/0?password=s3cret", "redis://u:s3cret@127.0.0.1:1/0",
                                   "redis://127.0.0.1:1/0?username=s3cret&password=s3cret"])
async def test_readyz_and_logs_never_show_the_store_password(tmp_path: Path, keys: Keys, store: str,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="maas")
    async with (harness.upstream() as up,
                harness.gateway(tmp_path, keys, models={"digits": v2_model(up.url)}, policy=ALLOW_ANALYSTS,
                                quota={"store": store, "on_store_error": "deny", "timeout_ms": 200},
                                audit={"enabled": False}) as gw):
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{gw.admin_url}/readyz") as r:
                assert r.status == 503
                text = await r.text()
        assert "127.0.0.1:1" in text  # still says which store is down
        assert SECRET not in text
        # the log line written when a store that answered stops answering
        store_obj = gw.gateway.quota.store
        store_obj._last_error = None  # as if it had answered until now
        with pytest.raises(StoreError):
            await store_obj.ping()
        assert "quota store redis://" in caplog.text and "failed" in caplog.text
        assert SECRET not in caplog.text


def test_check_errors_never_show_the_store_password(tmp_path: Path, keys: Keys) -> None:
    """A config error that quotes the value (a URL given where a string belongs) prints it masked."""
    config = gateway_config(tmp_path, keys, models={"digits": v2_model("http://127.0.0.1:9")}, policy=ALLOW_ANALYSTS,
                            quota={"store": ["redis://u:s3cret@10.0.0.5/0"]})
    path = write_yaml(tmp_path / "gateway.yaml", config)
    for command in ("check", "serve"):
        done = subprocess.run([sys.executable, "-m", "gateway", command, "-c", str(path)], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode != 0
        assert "quota.store" in done.stderr and "***@10.0.0.5" in done.stderr, done.stderr
        assert SECRET not in done.stdout + done.stderr
