"""``quota.password_env`` wins over any password the store URL carries (redis-py would let the URL's win)."""

from __future__ import annotations

import pytest

from gateway.quota.redis_connect import _without_password


@pytest.mark.parametrize(("url", "expected"), [
    ("redis://:old@h:6379/0", "redis://h:6379/0"),
    ("redis://u:old@h:6379/0", "redis://u@h:6379/0"),
    ("redis://h:6379/0?password=old", "redis://h:6379/0"),
    ("redis://h:6379/0?socket_timeout=1&PASSWORD=old&db=2", "redis://h:6379/0?socket_timeout=1&db=2"),
    ("rediss://u:old@h/0?password=old2", "rediss://u@h/0"),
    ("redis://h:6379/0", "redis://h:6379/0"),
    ("redis+sentinel://:s@h:26379/mymaster", "redis+sentinel://:s@h:26379/mymaster"),
])
def test_password_env_strips_every_url_password(url: str, expected: str) -> None:
    assert _without_password(url) == expected
