"""Connecting to the Redis that holds the quotas: plain, TLS, unix socket, Sentinel or Cluster.

URLs: ``redis://``, ``rediss://`` (TLS), ``unix://``, Redis Cluster
(``quota.cluster: true``) and ``redis+sentinel://[user:pass@]host:port[,host:port...]/service[/db]``
(add ``?ssl=true`` for TLS to the master). ``quota.password_env`` names the
variable holding the password for Redis (the Sentinel master); it overrides
a password in the URL. Credentials in a Sentinel URL authenticate to the
sentinels themselves.

Timeouts: ``socket_connect_timeout`` and ``socket_timeout`` are ``quota.timeout_ms``,
and ``RedisStore`` bounds every call with the same deadline on top. No blind
retries: a retried script could be applied twice, and the pool already replaces
sockets that died with a Redis restart before using them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, parse_qsl, unquote, urlencode, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from ..errors import ConfigError
from ..redact import redact_url

if TYPE_CHECKING:
    from ..config import QuotaConfig


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, int, bool, str | None, str | None]:
    """``redis+sentinel://[user:pass@]h:p[,h:p]/service[/db][?ssl=true]`` -> (hosts, service, db, ssl, user, password)."""
    parts = urlsplit(url)
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    user = password = None
    if userinfo:
        u, _, p = userinfo.partition(":")
        user, password = (unquote(u) or None), (unquote(p) or None)
    hosts: list[tuple[str, int]] = []
    for item in filter(None, hostlist.split(",")):
        if item.startswith("["):  # [ipv6]:port
            host, _, port = item[1:].partition("]")
            port = port.lstrip(":")
        else:
            host, _, port = item.partition(":")
        host = host or "localhost"
        try:
            hosts.append((host, int(port) if port else 26379))
        except ValueError:
            raise ConfigError(f"bad sentinel address {item!r} in quota.store", key="quota.store") from None
    path = [p for p in parts.path.split("/") if p]
    if not hosts or not path:
        raise ConfigError("a Sentinel URL is redis+sentinel://host:port[,host:port]/service_name[/db]", key="quota.store")
    try:
        db = int(path[1]) if len(path) > 1 else 0
    except ValueError:
        raise ConfigError(f"bad database number {path[1]!r} in quota.store", key="quota.store") from None
    ssl = parse_qs(parts.query).get("ssl", ["false"])[0].lower() in ("1", "true", "yes")
    return hosts, unquote(path[0]), db, ssl, user, password


def connect(config: QuotaConfig) -> Any:
    """A redis-py asyncio client for ``config.store`` (not yet connected: redis-py connects lazily)."""
    timeout = config.timeout_ms / 1000
    common: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    if config.password_env:
        password = os.environ.get(config.password_env)
        if password is None:
            raise ConfigError(f"environment variable {config.password_env} is not set", key="quota.password_env")
        common["password"] = password
    url = config.store
    if config.password_env:
        url = _without_password(url)  # redis-py lets a URL password win over the password argument
    if url.startswith("redis+sentinel://"):
        hosts, service, db, ssl, user, spass = parse_sentinel_url(url)
        sentinel_kwargs: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
        if spass:
            sentinel_kwargs.update(username=user, password=spass)
        sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs)
        return sentinel.master_for(service, db=db, ssl=ssl, **common)
    if config.cluster:
        return RedisCluster.from_url(url, **common)
    return aioredis.from_url(url, **common)


def _without_password(url: str) -> str:
    """The URL less its password (user-info or ``?password=``): with ``password_env`` the env var must win."""
    if url.startswith("redis+sentinel://"):
        return url  # a Sentinel URL's credentials are the sentinels' own
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k.lower() != "password"]
    parts = parts._replace(query=urlencode(query))
    if "@" in parts.netloc:
        userinfo, _, hosts = parts.netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        parts = parts._replace(netloc=f"{user}@{hosts}" if user else hosts)
    return parts.geturl()


# The store URL without any credential form (user-info, ?password=, ?username=...), for logs and /readyz.
redact = redact_url
