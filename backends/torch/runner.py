"""Dynamic batching: many small requests, one forward pass, one dedicated worker thread.

A forward pass over 64 samples costs little more than over one, so requests
that arrive together are run together: the collector takes the first waiting
request, then whatever else is queued, then waits at most
``max_batch_delay_ms`` for more, up to ``max_batch_size`` samples. The batch
runs in a single worker thread (torch releases the GIL, so the event loop keeps
serving meanwhile); while it runs, the next batch queues up. So even with a
delay of 0 a loaded model runs in batches (everything that queued while the
previous batch ran), and no request waits for company that may not come; a
delay buys larger batches under light load at the price of that much latency.
The queue is bounded: when it is full the request is refused at once with 503
and ``Retry-After`` instead of letting memory and latency grow without limit.

This module knows nothing about torch: it runs a ``forward`` callable over
numpy arrays, which the backend builds around the model.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np

from gateway.errors import BackendError, Unavailable

if TYPE_CHECKING:
    from gateway.metrics import Metrics

log = logging.getLogger("maas.torch.runner")

Forward = Callable[[list[np.ndarray]], np.ndarray]  # inputs of one batch, in order -> outputs stacked on axis 0


class Clock(Protocol):
    """What the collector times its batch delay with: the event loop itself, or a test's fake clock."""

    def time(self) -> float: ...

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> Any: ...


@dataclass(slots=True)
class _Job:
    inputs: np.ndarray  # (n, *sample shape)
    future: asyncio.Future[np.ndarray]


class BatchRunner:
    """Queue, collector and worker thread for one model."""

    def __init__(self, forward: Forward, *, name: str, max_batch_size: int, max_batch_delay_s: float,
                 max_queue: int, metrics: Metrics | None = None, clock: Clock | None = None) -> None:
        self.name = name
        self._clock = clock  # None: the running loop (the seam for tests: a fake clock instead of real delays)
        self._forward = forward
        self._max_batch = max_batch_size
        self._delay = max_batch_delay_s
        self._max_queue = max_queue
        self._pending: collections.deque[_Job] = collections.deque()
        self._arrived: asyncio.Future[None] | None = None  # set by infer() to wake the collector
        self._collector: asyncio.Task[None] | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._closing = False
        self._busy = False
        self._taken: list[_Job] = []
        self._running: list[_Job] = []
        self._batch_metric = metrics.runner_batch_size.labels(name) if metrics else None
        self._depth_metric = metrics.runner_queue_depth.labels(name) if metrics else None
        self._rejected_metric = metrics.runner_rejections.labels(name) if metrics else None
        # stats() counters: plain ints, only touched on the event loop
        self.batches = 0
        self.requests = 0
        self.samples = 0
        self.rejected = 0
        self.max_batch_seen = 0
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # requests per batch -> batches
        self.busy_s = 0.0

    async def start(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"torch-{self.name}")
        self._collector = asyncio.create_task(self._collect(), name=f"torch-collector-{self.name}")

    def run_sync(self, inputs: list[np.ndarray]) -> np.ndarray:
        """Run a batch in the worker thread from synchronous code (warm-up at start-up)."""
        assert self._executor is not None
        return self._executor.submit(self._forward, inputs).result()

    async def infer(self, inputs: np.ndarray) -> np.ndarray:
        """Queue ``inputs`` (n samples) and wait for their outputs."""
        if self._executor is None or self._closing:
            raise Unavailable(f"model {self.name} is not available")
        pending = self._pending
        if len(pending) >= self._max_queue:
            self.rejected += 1
            if self._rejected_metric is not None:
                self._rejected_metric.inc()
            raise Unavailable(f"model {self.name} is overloaded, retry shortly", headers={"Retry-After": "1"})
        job = _Job(inputs, asyncio.get_running_loop().create_future())
        pending.append(job)
        arrived = self._arrived
        if arrived is not None and not arrived.done():
            arrived.set_result(None)
        if self._depth_metric is not None:
            self._depth_metric.set(len(pending))
        return await job.future

    async def _arrival(self, loop: asyncio.AbstractEventLoop, clock: Clock, deadline: float | None) -> None:
        """Sleep until infer() queues a job or, given a deadline on ``clock``, until then (whichever comes first)."""
        self._arrived = arrived = loop.create_future()
        timer = clock.call_at(deadline, _wake, arrived) if deadline is not None else None
        try:
            await arrived
        finally:
            self._arrived = None
            if timer is not None:
                timer.cancel()

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        clock: Clock = self._clock or loop
        pending = self._pending
        taken = self._taken  # jobs out of the queue but not answered: failed if the collector is cancelled
        try:
            while True:
                if not taken:
                    while not pending:
                        await self._arrival(loop, clock, None)
                    taken.append(pending.popleft())
                n = len(taken[0].inputs)
                size = 1
                deadline = clock.time() + self._delay
                while n < self._max_batch:
                    if not pending:
                        if clock.time() >= deadline:  # also at once with a delay of 0
                            break
                        await self._arrival(loop, clock, deadline)
                        if not pending:
                            break
                    job = pending.popleft()
                    taken.append(job)
                    if n + len(job.inputs) > self._max_batch:
                        break  # it starts the next batch: a batch never exceeds max_batch_size samples
                    n += len(job.inputs)
                    size += 1
                if self._depth_metric is not None:
                    self._depth_metric.set(len(pending))
                batch = taken[:size]
                del taken[:size]
                live = [j for j in batch if not j.future.done()]  # callers that went away are skipped
                if live:
                    self._running = live
                    await self._run(loop, live)
                    self._running = []
        except asyncio.CancelledError:
            for j in (*self._running, *taken):
                if not j.future.done():
                    j.future.set_exception(Unavailable(f"model {self.name} is shutting down"))
            self._running = []
            taken.clear()
            raise

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Job]) -> None:
        assert self._executor is not None
        self._busy = True
        started = time.perf_counter()
        try:
            outputs = await loop.run_in_executor(self._executor, self._forward, [j.inputs for j in batch])
        except Exception:
            log.exception("model %s: batch of %d request(s) failed", self.name, len(batch))
            for j in batch:
                if not j.future.done():
                    j.future.set_exception(BackendError(f"model {self.name} failed to run the request"))
            return
        finally:
            self._busy = False
            self.busy_s += time.perf_counter() - started
        offset = 0
        for j in batch:
            end = offset + len(j.inputs)
            if not j.future.done():
                j.future.set_result(outputs[offset:end])
            offset = end
        size = len(batch)
        self.batches += 1
        self.requests += size
        self.samples += offset
        self.batch_sizes[size] += 1
        if size > self.max_batch_seen:
            self.max_batch_seen = size
        if self._batch_metric is not None:
            self._batch_metric.observe(size)

    def stats(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "requests": self.requests,
            "samples": self.samples,
            "rejected": self.rejected,
            "mean_batch_size": round(self.requests / self.batches, 2) if self.batches else 0.0,
            "max_batch_size_seen": self.max_batch_seen,
            "batch_sizes": dict(sorted(self.batch_sizes.items())),
            "queue_depth": len(self._pending),
            "worker_busy_s": round(self.busy_s, 3),
        }

    async def close(self, timeout_s: float = 10.0) -> None:
        """Stop taking requests, finish what is queued (up to ``timeout_s``), then stop the worker."""
        self._closing = True
        pending = self._pending
        deadline = time.monotonic() + timeout_s
        while self._executor is not None and (pending or self._busy) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._collector is not None:
            self._collector.cancel()
            try:
                await self._collector
            except asyncio.CancelledError:
                pass
            self._collector = None
        while pending:
            job = pending.popleft()
            if not job.future.done():
                job.future.set_exception(Unavailable(f"model {self.name} is shutting down"))
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown, True)
            self._executor = None


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
