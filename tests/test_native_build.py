"""The native build (``gateway/native.py``): what it compiles keeps to what mypyc gets right, and a stale build
is refused instead of run."""

from __future__ import annotations

import ast
import asyncio
import importlib.machinery
import os
import time
from pathlib import Path

import pytest

from gateway import native

ROOT = Path(__file__).resolve().parents[1]


def _suspends(nodes: list[ast.stmt]) -> int | None:
    for node in nodes:
        for sub in ast.walk(node):
            if isinstance(sub, (ast.Await, ast.AsyncFor, ast.AsyncWith)):
                return sub.lineno
    return None


def test_compiled_modules_never_re_raise_after_an_await_in_a_handler() -> None:
    """mypyc re-raises a ``finally``'s (or a bare ``raise``'s) exception from the thread's current one: after an
    await there, that is whatever another coroutine was handling meanwhile, so a request could end with another
    request's error (seen: an upstream timeout escaping a request that had been cancelled). Compiled modules keep
    such exceptions in a variable and raise that (``http_door.answer``)."""
    found = []
    for source in native.COMPILED:
        tree = ast.parse((ROOT / source).read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Try):
                continue
            line = _suspends(node.finalbody)
            if line is not None:
                found.append(f"{source}:{line}: await in a finally")
            for handler in node.handlers:
                line = _suspends(handler.body)
                bare = any(isinstance(s, ast.Raise) and s.exc is None for b in handler.body for s in ast.walk(b))
                if line is not None and bare:
                    found.append(f"{source}:{line}: await, then a bare raise, in an except")
    assert not found, found


def test_the_rule_above_is_real_in_this_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the rule guards against, shown on the gateway's own code when it runs natively: the door's
    ``answer`` hands each request's own exception on, with others being handled in between."""
    from gateway import http_door

    if "gateway/http_door.py" in native.built():
        pytest.skip("the door is native: its _answer cannot be replaced (the AST rule above covers it)")
    seen = []

    class Stop(Exception):
        pass

    class Gateway:
        def begin(self, request: object) -> object:
            return object()

        async def finish(self, ctx: object) -> None:
            await asyncio.sleep(0.01)  # another request's error is handled meanwhile

    async def failing(self: object, ctx: object, request: object, connection: object) -> None:
        raise Stop("mine")

    monkeypatch.setattr(http_door.HttpDoor, "_answer", failing)
    door = http_door.HttpDoor(Gateway())  # type: ignore[arg-type]

    async def other() -> None:
        try:
            raise KeyError("another request's")
        except KeyError:
            await asyncio.sleep(0.02)

    async def main() -> None:
        results = await asyncio.gather(door.answer(None, None), other(),  # type: ignore[arg-type]
                                       return_exceptions=True)
        seen.append(results[0])

    asyncio.run(main())
    assert isinstance(seen[0], Stop) and str(seen[0]) == "mine"


def test_a_native_build_older_than_its_source_is_refused(tmp_path: Path) -> None:
    source = tmp_path / native.COMPILED[0]
    source.parent.mkdir(parents=True)
    source.write_text("x = 1\n")
    built = source.with_suffix(importlib.machinery.EXTENSION_SUFFIXES[0])  # what mypyc leaves beside it
    built.write_bytes(b"")
    old = time.time() - 60
    os.utime(built, (old, old))
    assert native.stale(tmp_path) == [native.COMPILED[0]]
    message = native.problem(tmp_path)
    assert message is not None and native.COMPILED[0] in message and "pip install -e ." in message
    os.utime(source, (old - 60, old - 60))  # the source is older than its build: nothing to say
    assert native.problem(tmp_path) is None
    # a module an earlier build compiled and this one does not: its extension would still be imported first
    leftover = tmp_path / "gateway" / "not_compiled.py"
    leftover.write_text("x = 1\n")
    os.utime(leftover, (old - 60, old - 60))
    leftover.with_suffix(importlib.machinery.EXTENSION_SUFFIXES[0]).write_bytes(b"")
    assert native.stale(tmp_path) == ["gateway/not_compiled.py"]


def test_serve_refuses_a_stale_native_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from gateway import launch
    from gateway.errors import ConfigError

    monkeypatch.setattr(native, "problem", lambda root=None: "compiled modules do not match their sources (x)")
    with pytest.raises(ConfigError, match="do not match their sources"):
        launch.serve(str(tmp_path / "never-read.yaml"))
