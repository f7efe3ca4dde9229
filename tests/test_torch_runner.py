"""Dynamic batching: batches form under concurrency, answers go to the right caller, the queue is bounded.

Exactness: with an integer model the batched answers are compared bit for bit
(any mix-up of rows between callers would show). With the real float model
they are compared with an absolute tolerance of 1e-6: CPU BLAS kernels pick
their blocking (and so the order of float additions) by matrix size, so the
same row can differ in the last bit or two between a batch of 1 and a batch of
64 — measured here at ~3e-7 on logits. Requiring bit-equality would forbid
batching itself; a difference that large would still flag any real error.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors

from backends.torch.archs import DigitsMLP
from backends.torch.runner import BatchRunner
from gateway.errors import BackendError, Unavailable
from gateway.metrics import Metrics
from tests import harness
from tests.clock import FakeClock
from tests.harness import eventually

BUNDLED = Path(__file__).resolve().parents[1] / "backends" / "torch" / "assets" / "digits.safetensors"


def digits_model() -> DigitsMLP:
    model = DigitsMLP()
    model.load_state_dict(load_safetensors(BUNDLED.read_bytes()))
    return model.eval()


def torch_forward(model: torch.nn.Module, seen: list[int] | None = None):  # type: ignore[no-untyped-def]
    def forward(inputs: list[np.ndarray]) -> np.ndarray:
        x = torch.from_numpy(np.concatenate(inputs))
        if seen is not None:
            seen.append(len(x))
        with torch.inference_mode():
            return model(x).numpy()
    return forward


async def started(forward, **kw) -> BatchRunner:  # type: ignore[no-untyped-def]
    options = {"name": "m", "max_batch_size": 64, "max_batch_delay_s": 0.005, "max_queue": 1024, **kw}
    runner = BatchRunner(forward, **options)
    await runner.start()
    return runner


async def test_concurrent_requests_are_batched_and_routed_exactly() -> None:
    sizes: list[int] = []

    def forward(inputs: list[np.ndarray]) -> np.ndarray:
        x = np.concatenate(inputs)
        sizes.append(len(x))
        return x * 3 + 1  # integer arithmetic: exact, so any row mix-up shows

    metrics = Metrics()
    async with harness.closing(await started(forward, max_batch_size=16, metrics=metrics)) as runner:
        requests = [np.arange(i * 10, i * 10 + 4, dtype=np.int64).reshape(1, 4) for i in range(64)]
        answers = await asyncio.gather(*(runner.infer(r) for r in requests))
        for r, a in zip(requests, answers):
            assert np.array_equal(a, r * 3 + 1)
        stats = runner.stats()
        assert stats["requests"] == 64 and stats["max_batch_size_seen"] > 1
        assert max(sizes) <= 16  # never more samples than max_batch_size
        assert metrics.registry.get_sample_value("maas_runner_batch_size_count", {"model": "m"}) == stats["batches"]


async def test_batched_digits_match_unbatched_inference() -> None:
    model = digits_model()
    seen: list[int] = []
    async with harness.closing(await started(torch_forward(model, seen))) as runner:
        rng = np.random.default_rng(0)
        samples = [rng.integers(0, 17, size=(1, 64)).astype(np.float32) for _ in range(64)]
        answers = await asyncio.gather(*(runner.infer(s) for s in samples))
        assert max(seen) > 1  # really batched (the first request may run alone)
        with torch.inference_mode():
            for s, a in zip(samples, answers):
                alone = model(torch.from_numpy(s)).numpy()
                np.testing.assert_allclose(a, alone, rtol=0, atol=1e-6)
                assert a.argmax() == alone.argmax()


async def test_multi_sample_requests_keep_their_rows() -> None:
    async with harness.closing(await started(lambda xs: np.concatenate(xs) * 2, max_batch_size=8)) as runner:
        a, b, c = (np.full((n, 2), n, dtype=np.int64) for n in (3, 5, 9))  # 9 > max: runs alone
        ra, rb, rc = await asyncio.gather(runner.infer(a), runner.infer(b), runner.infer(c))
        assert ra.shape == (3, 2) and (ra == 6).all()
        assert rb.shape == (5, 2) and (rb == 10).all()
        assert rc.shape == (9, 2) and (rc == 18).all()


async def test_batch_delay_waits_for_company_until_the_deadline() -> None:
    """With a delay, the first request waits up to max_batch_delay_s for others; then the batch runs, full or not."""
    sizes: list[int] = []

    def forward(inputs: list[np.ndarray]) -> np.ndarray:
        sizes.append(len(inputs))
        return np.concatenate(inputs)

    clock = FakeClock()
    async with harness.closing(await started(forward, max_batch_delay_s=0.05, clock=clock)) as runner:
        first = asyncio.ensure_future(runner.infer(np.zeros((1, 1))))
        await eventually(lambda: clock.sleepers == 1)  # the collector took it and waits for company
        clock.advance(0.04)
        second = asyncio.ensure_future(runner.infer(np.ones((1, 1))))  # within the delay: joins the batch
        await clock.settle()
        assert sizes == [] and not first.done()  # 10 ms of the delay left: nothing ran yet
        clock.advance(0.02)  # the thing under test: the delay runs out
        assert [int(a[0, 0]) for a in await asyncio.gather(first, second)] == [0, 1]
        assert sizes == [2]
        third = asyncio.ensure_future(runner.infer(np.full((1, 1), 2)))
        await eventually(lambda: clock.sleepers == 1)  # a new batch: a new delay, on its own
        clock.advance(0.05)
        assert int((await third)[0, 0]) == 2 and sizes == [2, 1]


async def test_full_queue_refuses_with_retry_after_instead_of_growing() -> None:
    gate, entered = threading.Event(), threading.Event()

    def blocked(inputs: list[np.ndarray]) -> np.ndarray:
        entered.set()
        gate.wait(10)
        return np.concatenate(inputs)

    metrics = Metrics()
    runner = await started(blocked, max_batch_size=4, max_batch_delay_s=0, max_queue=8, metrics=metrics)
    try:
        first = asyncio.ensure_future(runner.infer(np.zeros((1, 1))))
        await eventually(entered.is_set)  # the worker is now stuck on the first batch
        flood = [asyncio.ensure_future(runner.infer(np.full((1, 1), i))) for i in range(200)]
        await eventually(lambda: sum(f.done() for f in flood) >= 200 - 8 - 4)  # the overflow is refused at once
        rejected = [f for f in flood if f.done() and isinstance(f.exception(), Unavailable)]
        assert len(rejected) >= 200 - 8 - 4  # at most the queue plus one collected batch are held
        assert rejected[0].exception().headers["Retry-After"] == "1"  # type: ignore[union-attr]
        assert runner.stats()["queue_depth"] <= 8
        assert metrics.registry.get_sample_value("maas_runner_rejections_total", {"model": "m"}) == len(rejected)
        gate.set()
        accepted = [f for f in flood if f not in rejected]
        results = await asyncio.gather(first, *accepted)
        assert len(results) == 1 + len(accepted)
    finally:
        gate.set()
        await runner.close()


async def test_with_no_delay_what_queued_behind_a_running_batch_runs_as_one_batch() -> None:
    gate, entered = threading.Event(), threading.Event()
    sizes: list[int] = []

    def forward(inputs: list[np.ndarray]) -> np.ndarray:
        entered.set()
        gate.wait(10)
        sizes.append(len(inputs))
        return np.concatenate(inputs)

    runner = await started(forward, max_batch_size=64, max_batch_delay_s=0)
    try:
        first = asyncio.ensure_future(runner.infer(np.zeros((1, 1))))
        await eventually(entered.is_set)  # the lone first request ran at once, without waiting for company
        rest = [asyncio.ensure_future(runner.infer(np.full((1, 1), i))) for i in range(10)]
        await eventually(lambda: runner.stats()["queue_depth"] == 10)  # all ten wait behind the running batch
        gate.set()
        results = await asyncio.gather(first, *rest)
        assert [float(r[0, 0]) for r in results[1:]] == list(range(10))
        assert sizes == [1, 10]
    finally:
        gate.set()
        await runner.close()


async def test_a_failing_batch_fails_its_callers_and_the_runner_goes_on() -> None:
    calls = []

    def flaky(inputs: list[np.ndarray]) -> np.ndarray:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return np.concatenate(inputs)

    async with harness.closing(await started(flaky)) as runner:
        with pytest.raises(BackendError, match="failed to run"):
            await runner.infer(np.zeros((1, 1)))
        assert (await runner.infer(np.ones((1, 1)))).tolist() == [[1.0]]


async def test_callers_that_went_away_are_skipped() -> None:
    gate, entered = threading.Event(), threading.Event()
    ran: list[int] = []

    def forward(inputs: list[np.ndarray]) -> np.ndarray:
        entered.set()
        gate.wait(10)
        ran.append(len(inputs))
        return np.concatenate(inputs)

    runner = await started(forward, max_batch_delay_s=0)
    try:
        first = asyncio.ensure_future(runner.infer(np.zeros((1, 1))))
        await eventually(entered.is_set)
        gone = asyncio.ensure_future(runner.infer(np.zeros((1, 1))))
        stays = asyncio.ensure_future(runner.infer(np.zeros((1, 1))))
        await eventually(lambda: runner.stats()["queue_depth"] == 2)  # both queued behind the running batch
        gone.cancel()
        gate.set()
        await first
        await stays
        assert ran == [1, 1]  # the cancelled request never reached the model
    finally:
        gate.set()
        await runner.close()


async def test_close_finishes_queued_work_then_refuses() -> None:
    runner = await started(lambda xs: np.concatenate(xs))
    pending = [asyncio.ensure_future(runner.infer(np.full((1, 1), i))) for i in range(10)]
    await asyncio.sleep(0)  # one loop turn, not a clock: the ten tasks start and queue before close()
    await runner.close(timeout_s=5)
    assert [int(p.result()[0, 0]) for p in pending] == list(range(10))
    with pytest.raises(Unavailable):
        await runner.infer(np.zeros((1, 1)))


async def test_close_with_a_stuck_model_fails_waiters_instead_of_hanging() -> None:
    gate, entered = threading.Event(), threading.Event()

    def stuck(inputs: list[np.ndarray]) -> np.ndarray:
        entered.set()
        gate.wait(10)
        return np.concatenate(inputs)

    runner = await started(stuck, max_batch_delay_s=0)
    running = asyncio.ensure_future(runner.infer(np.zeros((1, 1))))
    await eventually(entered.is_set)
    queued = asyncio.ensure_future(runner.infer(np.zeros((1, 1))))
    await eventually(lambda: runner.stats()["queue_depth"] == 1)
    closing = asyncio.ensure_future(runner.close(timeout_s=0.1))
    await eventually(lambda: running.done() and queued.done(), timeout=1.0)  # close gives up after its 0.1 s
    for f in (running, queued):
        assert f.done() and isinstance(f.exception(), Unavailable)
    gate.set()
    await closing
