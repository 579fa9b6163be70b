"""Micro-batching: concurrent requests share one model call.

Requests `submit` their inputs; a collector task groups queued jobs until the batch holds
`max_batch_size` inputs or the oldest job has waited `max_wait_ms`, then runs one `predict_fn` call
on a single model thread and hands each job its own slice of the results, in order. The wait counts
from the oldest job's arrival, so jobs that queued up while the model was busy leave at once.

Batches form even with `max_wait_ms=0` (the serving default): the collector waits for the model
call in progress, and everything that arrived meanwhile leaves together in the next call. Measured
on a 2-core CPU, a window on top of that only added latency at low load (docs/serving.md).

A job is never split across calls (its results come from one model version and one call); a job
bigger than `max_batch_size` runs alone. If a batched call raises, each job is retried alone, so
one bad request cannot fail the requests that happened to share its batch.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Sequence, TypeVar

Result = TypeVar("Result")
PredictFn = Callable[[list[Any]], Sequence[Result]]
BatchObserver = Callable[[int], None]


@dataclass
class _Job:
    items: list[Any]
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class MicroBatcher(Generic[Result]):
    """Groups concurrent `submit` calls into few `predict_fn` calls; `enabled=False` runs each alone."""

    def __init__(self, predict_fn: PredictFn, max_batch_size: int = 32, max_wait_ms: float = 0.0,
                 enabled: bool = True, on_batch: BatchObserver | None = None) -> None:
        self.predict_fn, self.max_batch_size, self.max_wait_s = predict_fn, max_batch_size, max_wait_ms / 1000
        self.enabled = enabled
        self.on_batch = on_batch or (lambda size: None)  # metrics hook: inputs per model call, batched or not
        self.in_flight = 0  # submitted requests still waiting for their results
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._carry: _Job | None = None  # taken from the queue but did not fit the last batch: leads the next
        self._closed = False
        # One model thread: onnxruntime already uses every core inside a call, so parallel calls only contend.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deepship-model")

    async def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.create_task(self._collect(), name="deepship-batcher")

    async def submit(self, items: Sequence[Any]) -> list[Result]:
        """Predict `items`; results in the same order. Raises whatever `predict_fn` raised for them."""
        items = list(items)
        self.in_flight += 1
        try:
            if not self.enabled or self._closed or self._task is None:
                # No batching (or closed by a reload): one call per request on the loop's default thread pool,
                # concurrent like a plain server, and still available after the model thread has stopped.
                return await asyncio.get_running_loop().run_in_executor(None, self._call, items)
            future: asyncio.Future = asyncio.get_running_loop().create_future()
            self._queue.put_nowait(_Job(items, future))
            return await future
        finally:
            self.in_flight -= 1

    async def close(self) -> None:
        """Finish every queued job, then stop the collector and the model thread."""
        self._closed = True
        if self._task is not None:
            await self._queue.join()
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._executor.shutdown(wait=True)

    # ------------------------------------------------------------------------------ internals
    def _call(self, items: list[Any]) -> list[Result]:
        self.on_batch(len(items))
        results = list(self.predict_fn(items))
        if len(results) != len(items):
            raise RuntimeError(f"predict_fn returned {len(results)} results for {len(items)} inputs")
        return results

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            try:
                await self._run_batch(loop, batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _next_batch(self) -> list[_Job]:
        """Block for one job, then add jobs until the batch is full or the oldest has waited long enough."""
        batch = [self._carry or await self._queue.get()]
        self._carry = None
        size = len(batch[0].items)
        deadline = batch[0].arrived + self.max_wait_s
        while size < self.max_batch_size:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            if size + len(job.items) > self.max_batch_size:
                self._carry = job  # does not fit: it leads the next batch, keeping arrival order
                break
            batch.append(job)
            size += len(job.items)
        return batch

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Job]) -> None:
        items = [item for job in batch for item in job.items]
        try:
            results = await loop.run_in_executor(self._executor, self._call, items)
        except Exception as exc:  # noqa: BLE001 - attributed to the guilty job(s) below
            if len(batch) == 1:
                _settle(batch[0].future, exc=exc)
                return
            for job in batch:  # isolate: only the job(s) that fail alone get the error
                try:
                    _settle(job.future, await loop.run_in_executor(self._executor, self._call, job.items))
                except Exception as job_exc:  # noqa: BLE001
                    _settle(job.future, exc=job_exc)
            return
        start = 0
        for job in batch:
            _settle(job.future, results[start : start + len(job.items)])
            start += len(job.items)


def _settle(future: asyncio.Future, result: Any = None, exc: BaseException | None = None) -> None:
    if future.done():  # the request was cancelled (client went away): nobody is waiting
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
