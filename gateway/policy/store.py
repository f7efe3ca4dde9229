"""The live policy: loaded at start-up, reloaded on change or SIGHUP, swapped atomically.

WHY one immutable object behind one attribute: a request reads ``store.current``
once and keeps that object for its whole decision, so a reload can never show
it half an old and half a new policy. A reload builds and checks the new policy
completely (schema, conditions, Casbin model) before the single assignment that
puts it in force; a file that fails any check is refused whole and the last good
policy stays, with a one-line error (file:line) in the log and a counter.

Watching polls the file's (mtime, size, inode, device) rather than relying on
inotify: it works on every platform and container filesystem, and it notices
editors and config-management tools that replace the file by rename.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError
from .compile import compile_policy
from .document import PolicyDocument, load_document
from .enforcer import PolicyEnforcer

if TYPE_CHECKING:
    from ..config import PolicyConfig
    from ..metrics import Metrics

log = logging.getLogger("maas.policy")

SETTLE_S = 0.05  # a changed file must stay unchanged this long before it is read

Signature = tuple[tuple[int, int, int, int] | None, ...]


@dataclass(frozen=True, slots=True)
class LoadedPolicy:
    """What is in force: the document (quotas and outputs read it too) and its enforcer."""

    document: PolicyDocument
    enforcer: PolicyEnforcer
    loaded_at: float  # time.time()


def load_policy(file: Path, model_file: Path | None = None, *, cache_size: int = 10_000,
                metrics: Metrics | None = None) -> LoadedPolicy:
    """Read, check and compile a policy file; ``ConfigError`` (one line) on any problem."""
    try:
        empty = not file.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        empty = False  # load_document reports it, with the file name
    if empty:  # more likely a file caught mid-write than a wish to deny everything
        raise ConfigError("policy file is empty (to deny every request, write: rules: [])", file=str(file))
    document = load_document(str(file))
    try:
        compiled = compile_policy(document, model_file)
    except ConfigError:
        raise
    except Exception as exc:  # never let a library's surprise become a traceback or a half policy
        raise ConfigError(f"cannot compile policy: {exc}", file=str(file)) from None
    return LoadedPolicy(document, PolicyEnforcer(compiled, cache_size, metrics), time.time())


def _stat(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


class PolicyStore:
    """``gateway.services.PolicySource`` backed by the policy file, with hot reload."""

    name = "policy"

    def __init__(self, config: PolicyConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self._current: LoadedPolicy | None = None
        self._signature: Signature | None = None
        self._lock = asyncio.Lock()
        self._watch_task: asyncio.Task[None] | None = None

    # -- what stages read ---------------------------------------------------------

    @property
    def current(self) -> LoadedPolicy | None:
        return self._current

    @property
    def document(self) -> PolicyDocument | None:
        current = self._current
        return current.document if current is not None else None

    def ready(self) -> str | None:
        return None if self._current is not None else "policy not loaded"

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Load the policy; a bad file at start-up is fatal (``ConfigError``), not a silent deny-all."""
        signature = self._file_signature()
        loaded = self._load()
        self._install(loaded, signature)
        log.info("policy loaded from %s (%d rules)", self.config.file, len(loaded.document.rules))
        if self.config.watch and self._watch_task is None:
            self._watch_task = asyncio.get_running_loop().create_task(self._watch(), name="policy-watch")

    async def reload(self) -> bool:
        """Re-read the file. False (and the last good policy kept) when it is invalid."""
        async with self._lock:
            signature = self._file_signature()  # taken first: a change while reading triggers another reload
            try:
                loaded = await asyncio.to_thread(self._load)
            except ConfigError as exc:
                self._signature = signature
                self._count("error")
                log.error("policy reload refused, keeping the last good policy: %s", exc)
                return False
            except Exception as exc:
                self._signature = signature
                self._count("error")
                log.error("policy reload refused, keeping the last good policy: %s: %s", self.config.file, exc)
                return False
            self._install(loaded, signature)
            self._count("ok")
            log.info("policy reloaded from %s (%d rules)", self.config.file, len(loaded.document.rules))
            return True

    async def close(self) -> None:
        task, self._watch_task = self._watch_task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    # -- internals ------------------------------------------------------------------

    def _load(self) -> LoadedPolicy:
        return load_policy(self.config.file, self.config.model_file, cache_size=self.config.decision_cache_size,
                           metrics=self.metrics)

    def _install(self, loaded: LoadedPolicy, signature: Signature) -> None:
        self._current = loaded  # the one assignment that changes policy
        self._signature = signature
        if self.metrics is not None:
            self.metrics.policy_loaded.set(1)

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.policy_reloads.labels(result=result).inc()

    def _file_signature(self) -> Signature:
        files = [self.config.file] + ([self.config.model_file] if self.config.model_file else [])
        return tuple(_stat(f) for f in files)

    async def _watch(self) -> None:
        interval = max(0.05, self.config.watch_interval_s)
        while True:
            await asyncio.sleep(interval)
            try:
                seen = self._file_signature()
                if seen == self._signature:
                    continue
                # a file edited in place may be caught half-written (a rule list cut short is still
                # valid YAML): wait until it stops changing before reading it
                while True:
                    await asyncio.sleep(SETTLE_S)
                    now = self._file_signature()
                    if now == seen:
                        break
                    seen = now
                await self.reload()
            except asyncio.CancelledError:
                raise
            except Exception:  # the watcher must outlive any single failure
                log.exception("policy watch failed; retrying")
