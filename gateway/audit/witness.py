"""The chain head, recorded outside the log after every flush, so cutting lines off the end shows.

The hash chain alone cannot tell a log whose last lines were cut from a log
that simply ended there: every remaining line still verifies. So after each
flush the writer records the head -- ``seq`` and hash of the last line written,
and the hash of line 1 as the log's identity -- somewhere an attacker who can
edit the log cannot: a file on another volume, or a Redis key. ``audit verify
--witness`` then finds lines missing from the end (the witness saw a higher
``seq``), a head line that was rewritten (hash mismatch) and a replaced file
(line 1 differs). With a key the record carries a ``mac`` too (same rule as a
line's), so the record itself cannot be forged without the key.

Where the record of the log ``FILE`` lives, given ``audit.witness: W``:

- ``W`` a path to a directory (existing, or written with a trailing ``/``):
  ``W/<FILE name>.witness``;
- ``W`` any other path: ``W`` itself;
- ``W`` a ``redis://``, ``rediss://`` or ``unix://`` URL: the key after ``#`` in the
  URL (``redis://h:6379/0#audit-a``), or ``maas:audit:witness:<FILE name>`` by
  default. Replicas sharing one Redis whose logs have the same file name need a
  key each (``#audit-${HOSTNAME}``: the config file substitutes ``${ENV}``).

Under ``serve --workers N`` worker ``i`` writes ``FILE.w<i>``, and the same
``.w<i>`` suffix is added to a witness file name or an explicit key (not when
the name already ends with it), so each worker's chain has its own head.
"""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson

from ..redact import redact_url
from .chain import Sealer

TIMEOUT_S = 0.5  # a witness call never holds the flush loop longer than this
WORKER_SUFFIX = re.compile(r"\.w\d+$")
DEFAULT_KEY_PREFIX = "maas:audit:witness:"


class WitnessError(Exception):
    """The witness cannot be read or written, or its record is malformed; one line, no credentials."""


@dataclass(frozen=True, slots=True)
class Head:
    """Where the chain stands: the last line written (``seq``, hash) and the hash of line 1."""

    seq: int
    hash: str
    first: str | None


def encode(head: Head, log_name: str, ts: str, sealer: Sealer) -> bytes:
    """The record: compact JSON, sealed with the log's key when it has one."""
    return sealer.seal(orjson.dumps({"v": 1, "log": log_name, "first": head.first, "seq": head.seq,
                                     "hash": head.hash, "ts": ts}))


def decode(raw: bytes, sealer: Sealer | None = None) -> Head:
    """Parse a record; with a keyed ``sealer`` its mac must be valid."""
    raw = raw.strip()
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise WitnessError("witness record is not valid JSON") from None
    if not isinstance(record, dict):
        raise WitnessError("witness record is not a JSON object")
    seq, digest, first = record.get("seq"), record.get("hash"), record.get("first")
    if not (isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0 and isinstance(digest, str)
            and (first is None or isinstance(first, str))):
        raise WitnessError("witness record lacks seq/hash/first")
    if sealer is not None and sealer.keyed:
        problem = sealer.check(raw)
        if problem:
            raise WitnessError(f"witness record: {problem}")
    return Head(seq, digest, first)


class Witness(Protocol):
    where: str  # for messages: the file, or the redacted URL and key

    async def write(self, record: bytes) -> None: ...

    async def read(self) -> bytes | None: ...

    def read_sync(self) -> bytes | None: ...

    async def close(self) -> None: ...


class FileWitness:
    """A record file replaced atomically (write a temporary beside it, fsync, rename), off the event loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)

    async def write(self, record: bytes) -> None:
        await asyncio.to_thread(self._write_sync, record)

    def _write_sync(self, record: bytes) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, record + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as exc:
            raise WitnessError(f"witness {self.path}: {exc.strerror or exc}") from None

    async def read(self) -> bytes | None:
        return await asyncio.to_thread(self.read_sync)

    def read_sync(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise WitnessError(f"witness {self.path}: {exc.strerror or exc}") from None

    async def close(self) -> None:
        return None


class RedisWitness:
    """One Redis key holding the record; the async client with short timeouts and no retries."""

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key
        self.where = f"{redact_url(url)} key {key}"
        self._client: Any = None

    def _async_client(self) -> Any:
        if self._client is None:
            import redis.asyncio as aioredis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            self._client = aioredis.from_url(self.url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S,
                                             retry=Retry(NoBackoff(), 0))
        return self._client

    async def write(self, record: bytes) -> None:
        try:
            await asyncio.wait_for(self._async_client().set(self.key, record), TIMEOUT_S * 2)
        except Exception as exc:  # redis-py raises many kinds; each is "the witness did not take it"
            raise WitnessError(f"witness {self.where}: {_describe(exc)}") from None

    async def read(self) -> bytes | None:
        try:
            value = await asyncio.wait_for(self._async_client().get(self.key), TIMEOUT_S * 2)
        except Exception as exc:
            raise WitnessError(f"witness {self.where}: {_describe(exc)}") from None
        return _as_bytes(value)

    def read_sync(self) -> bytes | None:
        import redis

        try:
            client = redis.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=2)
            try:
                value = client.get(self.key)
            finally:
                client.close()
        except Exception as exc:
            raise WitnessError(f"witness {self.where}: {_describe(exc)}") from None
        return _as_bytes(value)

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            try:
                await client.aclose()
            except Exception:  # closing a client whose server went away is not worth a traceback
                pass


def locate(spec: str, log_path: Path) -> FileWitness | RedisWitness:
    """The witness of the log at ``log_path`` for ``audit.witness: spec`` (rules in the module docstring)."""
    found = WORKER_SUFFIX.search(log_path.name)
    suffix = found.group(0) if found else ""
    if "://" in spec:
        url, _, key = spec.partition("#")
        if not key:
            key = DEFAULT_KEY_PREFIX + log_path.name
        elif suffix and not key.endswith(suffix):
            key += suffix
        return RedisWitness(url, key)
    path = Path(spec).expanduser()
    if spec.endswith("/") or path.is_dir():
        return FileWitness(path / f"{log_path.name}.witness")
    if suffix and not path.name.endswith(suffix):
        path = path.with_name(path.name + suffix)
    return FileWitness(path)


def _as_bytes(value: Any) -> bytes | None:
    """A GET answer as bytes (the client is built without ``decode_responses``, but be strict about it)."""
    if value is None:
        return None
    return value.encode() if isinstance(value, str) else bytes(value)


def _describe(exc: BaseException) -> str:
    from ..redact import redact_text

    if isinstance(exc, asyncio.TimeoutError):
        return f"no answer within {TIMEOUT_S * 2:g}s"
    return redact_text(str(exc) or type(exc).__name__)
