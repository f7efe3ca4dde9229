"""Helpers for the quota tests: a private redis-server to freeze and kill, request contexts, a policy holder."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from gateway.pipeline import Decision, Identity, RequestContext, Route, RouteKind
from gateway.policy.document import PolicyDocument, QuotaRule, load_document
from gateway.request import BufferedRequest
from tests.harness import free_port  # noqa: F401  (re-exported: quota tests import it from here)


def unique_prefix() -> str:
    return f"maas-test:{uuid.uuid4().hex[:12]}:"


def delete_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    except redis.RedisError:
        pass
    finally:
        client.close()


class RedisServer:
    """A redis-server this test owns: on its own port, stopped, frozen and killed by its PID only."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed")
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                client = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
                if client.ping():
                    client.close()
                    return self
            except redis.RedisError:
                time.sleep(0.05)  # the poll interval of this wait on a condition, not a clock
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def freeze(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@dataclass
class Policy:
    """A PolicySource for tests: the document can be swapped like a reload does."""

    document: PolicyDocument | None


def document(*quotas: QuotaRule) -> PolicyDocument:
    return PolicyDocument(quotas=list(quotas))


def outputs_policy(tmp_path: Path, outputs: str) -> Policy:
    """A policy with no rules and the given ``outputs:`` entries (YAML lines), loaded as the gateway loads one."""
    path = tmp_path / "policy.yaml"
    path.write_text(f"rules: []\noutputs:\n{outputs}")
    return Policy(load_document(str(path)))


def redis_up(url: str) -> bool:
    """Whether the test Redis answers (tests that need it skip otherwise)."""
    try:
        redis.Redis.from_url(url, socket_timeout=1).ping()
        return True
    except redis.RedisError:
        return False


def context(subject: str = "alice", roles: tuple[str, ...] = ("analyst",), model: str = "digits", *,
            kind: RouteKind = RouteKind.V2_INFER, body: Any = None, path: str = "",
            request_id: str = "rid") -> RequestContext:
    """A request context as the stages before quota leave it (authenticated and authorised)."""
    if kind is RouteKind.OPENAI:
        route = Route(kind, "infer", None, True)
        path = path or "/v1/chat/completions"
    else:
        route = Route(kind, "infer", model, True)
        path = path or f"/v2/models/{model}/infer"
    return RequestContext(
        request=BufferedRequest("POST", path),
        request_id=request_id,
        started=time.monotonic(),
        path=path,
        route=route,
        model_name=model,
        identity=Identity(subject, roles, {"sub": subject, "roles": list(roles)}, "jwt"),
        decision=Decision(True, "test-allow", roles),
        json=body,
    )


async def finish(ctx: RequestContext) -> None:
    """Run the request's cleanups as the app does when the request ends, then let the releases they
    started reach the store (the app does not wait for them; a test reads the store after)."""
    import inspect

    from gateway.quota.concurrency import drain

    for callback in ctx._cleanups:
        result = callback(ctx)
        if inspect.isawaitable(result):
            await result
    await drain()
