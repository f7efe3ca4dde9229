"""``serve --workers N``: N gateway processes on one port, and a parent that keeps N alive.

The workers share the listening port through SO_REUSEPORT; the parent serves
nothing. It only starts the workers, relays SIGTERM/SIGINT/SIGHUP to them, and
replaces a worker that exits when nobody asked it to (a crash, an OOM kill, a
``kill -9``, even a clean exit 0), so the port keeps its capacity without an
orchestrator noticing. Each slot has its own exponential back-off (0.5 s
doubling to 30 s, reset once a worker of the slot has lived 60 s): a worker
that dies at start (a config broken since, a disk gone) is retried at a
bounded rate instead of spinning the CPU and flooding the log.

Start-up is different: a worker of the first generation that exits before it
is ready (port taken, bad model) means the gateway cannot start as configured,
so the parent stops the others and exits 1, the same as a single-process
``serve`` whose start fails. A worker says it is ready through a pipe once its
listeners are bound and its own signal handlers are installed; SIGHUP goes
only to ready workers (a starting one has no handler yet and would die of it,
and it reads the fresh policy anyway).

The loop is plain blocking code, not asyncio: ``multiprocessing.connection.wait``
on the workers' sentinels, their ready pipes and a signal wake-up pipe, with a
timeout for the next back-off deadline. Signal handlers only record the signal;
the loop relays it, so a worker started while a signal arrives is never missed.

On SIGTERM/SIGINT nothing is replaced any more; the parent waits for every
worker and exits 0, or 1 when a worker failed during the shutdown (an exit
other than 0 or the signal that was relayed to it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import signal
import time
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, Callable

log = logging.getLogger("maas.workers")

MIN_BACKOFF_S = 0.5  # wait before the first replacement of a slot
MAX_BACKOFF_S = 30.0  # the back-off doubles up to this
STABLE_AFTER_S = 60.0  # a worker that lived this long resets its slot's back-off
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RELAYED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

Target = Callable[..., None]  # target(*args, index, ready_conn): runs one worker until it is told to stop


@dataclasses.dataclass
class _Slot:
    """One of the N places a worker runs in; its index names the worker's audit file (``.w{index}``)."""

    index: int
    process: BaseProcess | None = None
    ready_conn: Connection | None = None  # open until the current worker said it is ready (or died)
    ready: bool = False  # the current worker is serving
    served: bool = False  # some worker of this slot has been ready: later deaths are replaced, not fatal
    started_at: float = 0.0
    backoff_s: float = MIN_BACKOFF_S
    restart_at: float | None = None  # when a replacement is due (None: nothing pending)


class Supervisor:
    """Runs ``count`` workers of ``target`` and keeps that many alive until SIGTERM/SIGINT."""

    def __init__(self, count: int, target: Target, args: tuple[Any, ...] = (), *,
                 on_exit: Callable[[int], None] | None = None,
                 context: multiprocessing.context.SpawnContext | None = None) -> None:
        self._ctx = context or multiprocessing.get_context("spawn")  # no fork: workers start clean of our state
        self._target, self._args, self._on_exit = target, args, on_exit
        self._slots = [_Slot(i) for i in range(count)]
        self._pending: list[int] = []  # signals received, not yet relayed (appended by the handler)
        self._stopping = False
        self._status = 0

    # -- the loop -------------------------------------------------------------------

    def run(self) -> int:
        """Start the workers and supervise them; returns the exit status for ``serve``."""
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in RELAYED_SIGNALS}
        old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        try:
            for slot in self._slots:
                self._start(slot)
            log.info("started %d workers (pids %s)", len(self._slots),
                     " ".join(str(s.process.pid) for s in self._slots if s.process))
            while True:
                self._relay_pending()
                if self._stopping and not any(s.process for s in self._slots):
                    return self._status
                now = time.monotonic()
                if not self._stopping:
                    for slot in self._slots:
                        if slot.restart_at is not None and slot.restart_at <= now:
                            self._start(slot)
                for obj in wait(self._waitables(wake_r), self._timeout(now)):
                    if obj == wake_r:
                        _drain(wake_r)
                self._collect()
        except BaseException:  # the parent itself failed (cannot fork, a bug): do not leave workers behind
            self._send(signal.SIGTERM)
            raise
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                if handler is not None:  # None: installed outside Python, cannot be put back
                    signal.signal(sig, handler)
            for slot in self._slots:
                self._close_ready(slot)
            os.close(wake_r)
            os.close(wake_w)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        """Only record it: the loop (woken by the wake-up fd) relays it and decides what it means."""
        self._pending.append(signum)

    def _relay_pending(self) -> None:
        while self._pending:
            signum = self._pending.pop(0)
            if signum in STOP_SIGNALS and not self._stopping:
                log.info("%s: stopping %d worker(s), no more replacements", signal.Signals(signum).name,
                         sum(1 for s in self._slots if s.process))
                self._stop_replacing()
            self._send(signum)

    def _stop_replacing(self) -> None:
        self._stopping = True
        for slot in self._slots:
            slot.restart_at = None

    def _send(self, signum: int) -> None:
        for slot in self._slots:
            # a worker that is not ready has no handler for SIGHUP yet and would die of it
            if slot.process is not None and (slot.ready or signum != signal.SIGHUP):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.process.pid or 0, signum)

    def _waitables(self, wake_r: int) -> list[Any]:
        objs: list[Any] = [wake_r]
        for slot in self._slots:
            if slot.process is not None:
                objs.append(slot.process.sentinel)
            if slot.ready_conn is not None:
                objs.append(slot.ready_conn)
        return objs

    def _timeout(self, now: float) -> float | None:
        due = [s.restart_at for s in self._slots if s.restart_at is not None]
        return max(0.0, min(due) - now) if due and not self._stopping else None

    # -- one slot -------------------------------------------------------------------

    def _start(self, slot: _Slot) -> None:
        reader, writer = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(target=self._target, args=(*self._args, slot.index, writer),
                                    name=f"maas-worker-{slot.index}")
        process.start()
        writer.close()  # the child holds the only write end: EOF on the reader means it died before ready
        replaced = slot.restart_at is not None
        slot.process, slot.ready_conn, slot.ready = process, reader, False
        slot.started_at, slot.restart_at = time.monotonic(), None
        if replaced:
            log.info("worker %d replaced: now pid %s", slot.index, process.pid)

    def _collect(self) -> None:
        """Read ready notes first (a worker may have said ready, then died), then reap the dead."""
        for slot in self._slots:
            conn = slot.ready_conn
            if conn is not None and conn.poll():
                try:
                    conn.recv_bytes()
                    slot.ready = slot.served = True
                except (EOFError, OSError):
                    pass
                self._close_ready(slot)
        for slot in self._slots:
            process = slot.process
            if process is not None and not process.is_alive():
                process.join()
                slot.process = None
                self._close_ready(slot)
                if self._on_exit is not None and process.pid is not None:
                    try:
                        self._on_exit(process.pid)
                    except Exception:  # bookkeeping must never stop supervision
                        log.exception("after worker %d exited", slot.index)
                self._exited(slot, process)

    def _exited(self, slot: _Slot, process: BaseProcess) -> None:
        code = process.exitcode
        how = _describe(code)
        lived = time.monotonic() - slot.started_at
        if self._stopping:
            if code not in (0, *(-s for s in STOP_SIGNALS)):
                log.error("worker %d (pid %s) %s during shutdown", slot.index, process.pid, how)
                self._status = 1
            return
        if not slot.served:
            log.error("worker %d (pid %s) %s before it was ready: the gateway cannot start; stopping",
                      slot.index, process.pid, how)
            self._status = 1
            self._stop_replacing()
            self._send(signal.SIGTERM)
            return
        if lived >= STABLE_AFTER_S:
            slot.backoff_s = MIN_BACKOFF_S
        delay = slot.backoff_s
        slot.backoff_s = min(delay * 2, MAX_BACKOFF_S)
        slot.restart_at = time.monotonic() + delay
        log.warning("worker %d (pid %s) %s after %.1f s; replacing it in %.1f s",
                    slot.index, process.pid, how, lived, delay)

    @staticmethod
    def _close_ready(slot: _Slot) -> None:
        if slot.ready_conn is not None:
            slot.ready_conn.close()
            slot.ready_conn = None


class ReadyNote:
    """Given to a worker's serve loop as ``ready``: ``set()`` tells the parent the worker is serving."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def set(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send_bytes(b"ready")
        self._conn.close()


def _describe(code: int | None) -> str:
    if code is None:
        return "vanished"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError, InterruptedError):
        while os.read(fd, 512):
            pass


# -- the gateway's workers ----------------------------------------------------------------


def run_workers(config_path: str, count: int) -> int:
    """``serve --workers N``: a shared metrics directory, then supervise N gateway workers."""
    import shutil
    import tempfile

    metrics_dir = tempfile.mkdtemp(prefix="maas-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # inherited by the spawned workers

    def forget_metrics(pid: int) -> None:
        # a dead worker's live gauges (in-flight requests, "is up" flags) must stop counting
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, metrics_dir)

    try:
        return Supervisor(count, worker_main, (config_path,), on_exit=forget_metrics).run()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def worker_main(config_path: str, index: int, ready_conn: Connection) -> None:
    """One worker process: the gateway on the shared port, its own audit file ``<file>.w{index}``.

    The audit suffix is the slot index, not the pid, so a replacement continues
    its slot's hash chain (it takes the file's lock once the dead worker is gone).
    """
    # until the serve loop installs its handlers, SIGINT (a terminal's Ctrl-C reaches the whole process
    # group) ends a starting worker quietly, as SIGTERM does, not with a KeyboardInterrupt traceback
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    import asyncio

    from .config import load_config
    from .errors import ConfigError
    from .redact import redact_text
    from .server import _serve, install_uvloop

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s w{index} %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(config_path)
        if config.audit and config.audit.file:  # one hash chain per process: interleaved writers would break it
            audit = dataclasses.replace(config.audit,
                                        file=config.audit.file.with_name(f"{config.audit.file.name}.w{index}"))
            config = dataclasses.replace(config, audit=audit)
        install_uvloop()
        asyncio.run(_serve(config, reuse_port=True, ready=ReadyNote(ready_conn)))
    except (ConfigError, OSError) as exc:  # one line, as `serve` prints it, not a traceback per crash-loop turn
        log.error("worker %d cannot run: %s", index, redact_text(str(exc)))
        raise SystemExit(1) from None
