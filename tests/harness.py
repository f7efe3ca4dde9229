"""Real servers for end-to-end tests: a JWT issuer, upstream model servers, and the gateway itself.

Everything listens on 127.0.0.1 with an OS-chosen port, so tests run in
parallel and never collide. ``start_gateway`` runs the real gateway (config
file on disk, the same ``server.start`` that ``serve`` uses).

Typical use: the factories ``upstream``, ``gateway`` and ``redis_server`` are async context
managers that stop what they started, so a test needs no try/finally of its own::

    async def test_x(tmp_path, keys):
        async with upstream() as up, gateway(tmp_path, keys, models={"digits": v2_model(up.url)},
                                             policy=ALLOW_ANALYSTS) as gw:
            async with aiohttp.ClientSession() as s:
                r = await s.post(gw.url + "/v2/models/digits/infer", json=..., headers=keys.auth("alice"))

``start_upstream`` / ``start_gateway`` (and ``.stop()``) remain for tests that stop or restart a
server in the middle; ``stopping(server)`` turns anything already started into such a context manager.

``tests`` is a package: helpers are imported as ``from tests.harness import ...`` (``tests.upstreams``,
``tests.http_helpers``, ``tests.quota_support``, ``tests.audit_support``, ``tests.certs``, ``tests.clock``
for a fake clock, ``tests.fake_upstream`` for the upstream client without sockets).
"""

from __future__ import annotations

import importlib.machinery
import json
import socket
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol, TypeVar

import jwt as pyjwt
import pytest
import yaml
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ISSUER = "https://idp.test"
AUDIENCE = "maas"

# A policy that lets `analyst` infer and read every model (most tests need a door that opens).
ALLOW_ANALYSTS: dict[str, Any] = {
    "roles": {"analyst": []},
    "rules": [{"id": "analysts-all", "roles": ["analyst"], "models": ["*"], "actions": ["infer", "read"],
               "effect": "allow"}],
}


class Keys:
    """An RSA signing key with its JWKS file, minting RS256 tokens like an identity provider."""

    def __init__(self, directory: Path, kid: str = "test-key-1") -> None:
        self.kid = kid
        self.private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.private_pem = self.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption())
        self.public_pem = self.private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                                     serialization.PublicFormat.SubjectPublicKeyInfo)
        jwk = json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(self.private_key.public_key()))
        jwk.update({"kid": kid, "alg": "RS256", "use": "sig"})
        self.jwks = {"keys": [jwk]}
        directory.mkdir(parents=True, exist_ok=True)
        self.jwks_file = directory / "jwks.json"
        self.jwks_file.write_text(json.dumps(self.jwks))
        self.public_key_file = directory / "jwt_public.pem"
        self.public_key_file.write_bytes(self.public_pem)

    def token(self, sub: str = "alice", roles: list[str] | tuple[str, ...] | None = ("analyst",), *,
              ttl_s: float = 300, headers: dict[str, Any] | None = None, **claims: Any) -> str:
        now = int(time.time())
        payload: dict[str, Any] = {"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + int(ttl_s)}
        if roles is not None:
            payload["roles"] = list(roles)
        payload.update(claims)
        return pyjwt.encode(payload, self.private_pem, algorithm="RS256", headers={"kid": self.kid, **(headers or {})})

    def auth(self, sub: str = "alice", roles: list[str] | tuple[str, ...] | None = ("analyst",), **claims: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(sub, roles, **claims)}"}

    def jwt_config(self) -> dict[str, Any]:
        return {"issuer": ISSUER, "audience": AUDIENCE, "algorithms": ["RS256"], "jwks_file": str(self.jwks_file)}


@dataclass
class Seen:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    all_headers: list[tuple[str, str]]
    body: bytes


@dataclass
class Upstream:
    url: str
    runner: web.AppRunner
    seen: list[Seen] = field(default_factory=list)

    async def stop(self) -> None:
        await self.runner.cleanup()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _default_handler(request: web.Request) -> web.StreamResponse:
    if request.path.endswith("/ready"):
        return web.json_response({"ready": True})
    if request.path == "/v1/chat/completions":
        return web.json_response({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "chat",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
        })
    if request.path.endswith("/infer"):
        return web.json_response({"model_name": "digits", "outputs": [
            {"name": "scores", "datatype": "FP32", "shape": [1, 10],
             "data": [0.01, 0.02, 0.6, 0.05, 0.1, 0.02, 0.05, 0.05, 0.05, 0.05]}]})
    return web.json_response({"ok": True, "path": request.path})


async def start_upstream(handler: Handler | None = None, *, port: int = 0) -> Upstream:
    """A real HTTP model server on loopback that records every request it receives."""
    holder: list[Upstream] = []
    inner = handler or _default_handler

    async def record(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        holder[0].seen.append(Seen(request.method, request.raw_path.partition("?")[0], request.query_string,
                                   dict(request.headers), list(request.headers.items()), body))
        return await inner(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    bound = next(a for a in runner.addresses if isinstance(a, tuple))[1]
    up = Upstream(f"http://127.0.0.1:{bound}", runner)
    holder.append(up)
    return up


def v2_model(url: str | list[str], **backend: Any) -> dict[str, Any]:
    urls = url if isinstance(url, list) else [url]
    return {"backend": {"type": "http", "protocol": "v2", "upstreams": urls, **backend}}


def openai_model(url: str | list[str], **backend: Any) -> dict[str, Any]:
    urls = url if isinstance(url, list) else [url]
    return {"backend": {"type": "http", "protocol": "openai", "upstreams": urls, **backend}}


@dataclass
class RunningGateway:
    url: str
    admin_url: str | None
    running: Any  # gateway.server.Running
    config_path: Path
    policy_path: Path | None

    @property
    def gateway(self) -> Any:
        return self.running.gateway

    async def stop(self) -> None:
        await self.running.stop()


def write_yaml(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def write_config(tmp_path: Path, text: str) -> Path:
    """``text`` as ``tmp_path/gateway.yaml``, beside an empty ``jwks.json`` (for configs that name one)."""
    (tmp_path / "jwks.json").write_text('{"keys": []}')
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


def gateway_config(tmp_path: Path, keys: Keys | None, *, models: dict[str, Any], policy: dict[str, Any] | str | None,
                   **sections: Any) -> dict[str, Any]:
    """A complete config dict: JWT auth from ``keys``, the given models and policy, audit in tmp_path."""
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, "upstream_timeout_s": 5, "shutdown_timeout_s": 5},
        "admin": {"host": "127.0.0.1", "port": 0},
        "auth": {"jwt": keys.jwt_config()} if keys else {},
        "audit": {"file": str(tmp_path / "audit.log")},
        "models": models,
    }
    if policy is not None:
        policy_path = tmp_path / "policy.yaml"
        if isinstance(policy, str):
            policy_path.write_text(policy)
        else:
            write_yaml(policy_path, policy)
        config["policy"] = {"file": str(policy_path), "watch": False}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


async def start_gateway(tmp_path: Path, keys: Keys | None = None, *, models: dict[str, Any],
                        policy: dict[str, Any] | str | None = None, **sections: Any) -> RunningGateway:
    """Write a config file to ``tmp_path`` and start the real gateway on free loopback ports."""
    from gateway.config import load_config
    from gateway.server import start

    config = gateway_config(tmp_path, keys, models=models, policy=policy, **sections)
    path = write_yaml(tmp_path / "gateway.yaml", config)
    loaded = load_config(path)
    running = await start(loaded, port=0, admin_port=0)
    admin = f"http://127.0.0.1:{running.admin_port}" if running.admin_port else None
    policy_path = Path(config["policy"]["file"]) if "policy" in config else None
    return RunningGateway(f"http://127.0.0.1:{running.port}", admin, running, path, policy_path)


@asynccontextmanager
async def upstream(handler: Handler | None = None, *, port: int = 0) -> AsyncIterator[Upstream]:
    """``start_upstream`` as an async context manager: stopped on the way out, whatever happened."""
    up = await start_upstream(handler, port=port)
    try:
        yield up
    finally:
        await up.stop()


@asynccontextmanager
async def gateway(tmp_path: Path, keys: Keys | None = None, *, models: dict[str, Any],
                  policy: dict[str, Any] | str | None = None, **sections: Any) -> AsyncIterator[RunningGateway]:
    """``start_gateway`` as an async context manager: stopped on the way out, whatever happened."""
    gw = await start_gateway(tmp_path, keys, models=models, policy=policy, **sections)
    try:
        yield gw
    finally:
        await gw.stop()


class _Stoppable(Protocol):
    async def stop(self) -> None: ...


S = TypeVar("S", bound=_Stoppable)


@asynccontextmanager
async def stopping(server: S) -> AsyncIterator[S]:
    """Anything already started with an async ``stop()`` (a test file's own gateway builder, say) as an async
    context manager: ``async with stopping(await gateway_for(...)) as gw:`` stops it on the way out."""
    try:
        yield server
    finally:
        await server.stop()


class _Closable(Protocol):
    async def close(self) -> None: ...


C = TypeVar("C", bound=_Closable)


@asynccontextmanager
async def closing(thing: C) -> AsyncIterator[C]:
    """The same for anything with an async ``close()`` (a JWT verifier, a batch runner, a backend)."""
    try:
        yield thing
    finally:
        await thing.close()


@asynccontextmanager
async def redis_server(workdir: Path, port: int | None = None) -> AsyncIterator[Any]:
    """A private redis-server (``quota_support.RedisServer``: freeze, thaw, kill) stopped on the way out."""
    import asyncio

    from tests.quota_support import RedisServer  # here, not at the top: quota_support imports the gateway

    server = RedisServer(workdir, port)
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        server.stop()


async def wait_ready(url: str, timeout: float = 30) -> None:
    """Poll ``url`` until it answers 200 (a gateway process's /readyz)."""
    import aiohttp

    async with aiohttp.ClientSession() as s:
        async def ready() -> bool:
            try:
                async with s.get(url) as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await eventually(ready, timeout, interval=0.1, message=f"{url} never became ready")


# Ports handed out by free_port(), each kept bound by a socket of ours until the test process exits.
_held_ports: dict[int, socket.socket] = {}


def free_port() -> int:
    """A loopback port that nothing else can be handed for the rest of the test run.

    Binding port 0 and closing the socket (the old way) let the OS give the same port to the next
    caller, or to any process, before the test's server bound it. Here the port stays bound by a
    socket this module keeps open, with SO_REUSEADDR and never listening. On Linux that means:

    - connecting to it is refused until a server listens on it (a "dead upstream" stays dead);
    - no bind of port 0, here or in another process, is given this port, and no plain bind gets it;
    - the server a test starts on it can still bind it: asyncio/aiohttp (in-process or a gateway
      subprocess, with or without SO_REUSEPORT) and redis-server all set SO_REUSEADDR, and Linux lets
      SO_REUSEADDR sockets share a port as long as the other one is not listening.
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    _held_ports[port] = s
    return port


async def eventually(predicate: Callable[[], Any], timeout: float = 5.0, *, interval: float = 0.01,
                     message: str | Callable[[], str] = "") -> Any:
    """Wait until ``predicate()`` (sync, or returning an awaitable) is truthy and return its value.

    For a test that waits on something another task or process does: it returns as soon as the
    condition holds (not after a guessed sleep) and fails with ``message`` when ``timeout`` passes.
    """
    import asyncio
    import inspect

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"condition not met within {timeout} s" + (f": {text}" if text else ""))
        await asyncio.sleep(interval)  # the poll interval of this wait, not a clock


async def raw_http(port: int, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send raw bytes (for malformed HTTP) and return everything the server answers until it closes."""
    import asyncio

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    chunks = []
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), timeout)
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                break
    except asyncio.TimeoutError:
        pass
    writer.close()
    return b"".join(chunks)


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":", 1)[1])
    return False


def error_fields(body: Any) -> dict[str, Any]:
    """An error answer's ``{type, message, request_id}`` in either shape the gateway writes.

    Flat on the Open Inference Protocol and Ollama paths (``/v2/...``, ``/api/...``:
    ``{"error": "<message>", "type": ..., "request_id": ...}``), nested elsewhere
    (``{"error": {"type", "message", "request_id"}}``); anything else fails the test.
    """
    if isinstance(body, (bytes, str)):
        body = json.loads(body)
    assert isinstance(body, dict) and "error" in body, body
    error = body["error"]
    if isinstance(error, dict):
        assert set(body) == {"error"} and set(error) == {"type", "message", "request_id"}, body
        return dict(error)
    assert isinstance(error, str) and set(body) == {"error", "type", "request_id"}, body
    return {"type": body["type"], "message": error, "request_id": body["request_id"]}


def skip_if_native(*classes: type) -> None:
    """Skip a test that replaces a method of ``classes`` when the native build compiled them (``gateway/native.py``):
    a compiled class's methods cannot be replaced. CI runs the suite on pure Python as well, where it runs."""
    for cls in classes:
        module = sys.modules[cls.__module__]
        if str(getattr(module, "__file__", "")).endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
            pytest.skip(f"replaces a method of {cls.__name__}, compiled in this build (run on pure Python)")
