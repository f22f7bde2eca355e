"""Cache misses generated in batches: misses that arrive while a batch runs form the next one.

Why: one task's adapter costs an encoder pass and a hypernetwork pass over small matrices;
16 tasks in one ``generate_many`` cost about 0.6x per task of what 16 single calls cost
(README, Benchmarks). Misses come in bursts (a demo pool's inputs choosing different demos,
a client creating adapters for many tasks at once), and the service has one hypernetwork
thread, so without batching the sixteenth miss of a burst waits for fifteen single passes.

No miss waits for a batch to fill: the first miss of an idle service starts at once, alone;
those that arrive meanwhile queue, and the next batch takes up to ``max_batch`` of them. An
adapter generated in a batch equals the one generated alone up to float rounding
(``tests/test_generator.py``). If a batch fails, its tasks are generated one by one, so only
a task that fails alone gets the error.
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Callable

from hypergen.task import Task

log = logging.getLogger(__name__)

Made = tuple[bytes, dict[str, float]]  # an adapter blob and its stage timings in ms
RunBatch = Callable[[list[Task], list[str]], list[Made]]  # blocking: tasks and their hashes in, one Made each out


@dataclass(eq=False)
class MissBatcher:
    """Queues misses and runs them through ``run`` on ``executor``, a batch at a time."""

    run: RunBatch
    executor: Executor
    max_batch: int = 16
    on_batch: Callable[[int], None] = lambda size: None  # told each batch's size (a metric)
    _queue: list[tuple[Task, str, asyncio.Future[Made]]] = field(default_factory=list, init=False)
    _worker: asyncio.Task[None] | None = field(default=None, init=False)

    async def generate(self, task: Task, task_hash: str) -> Made:
        """The blob for one miss; joins the batch that starts next (at once when idle)."""
        done: asyncio.Future[Made] = asyncio.get_running_loop().create_future()
        self._queue.append((task, task_hash, done))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.ensure_future(self._drain())
        return await done

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            self.on_batch(len(batch))
            try:
                made = await loop.run_in_executor(self.executor, self.run, [t for t, _, _ in batch], [h for _, h, _ in batch])
                if len(made) != len(batch):  # never leave a waiter without an answer
                    raise RuntimeError(f"{len(made)} adapters came back for a batch of {len(batch)}")
            except Exception as exc:  # noqa: BLE001 (settled task by task)
                if len(batch) == 1:
                    _settle(batch[0][2], exc)
                else:
                    log.warning("a batch of %d misses failed (%s); generating them one by one", len(batch), exc)
                    await self._one_by_one(batch)
                continue
            for (_, _, done), result in zip(batch, made):
                _settle(done, result)

    async def _one_by_one(self, batch: list[tuple[Task, str, asyncio.Future[Made]]]) -> None:
        loop = asyncio.get_running_loop()
        for task, task_hash, done in batch:
            try:
                (result,) = await loop.run_in_executor(self.executor, self.run, [task], [task_hash])
            except Exception as exc:  # noqa: BLE001 (handed to the one caller it belongs to)
                result = exc
            _settle(done, result)


def _settle(done: asyncio.Future[Made], result: Made | BaseException) -> None:
    """Hands a result or an error to the miss's waiter (unless it gave up waiting)."""
    if done.done():
        return
    if isinstance(result, BaseException):
        done.set_exception(result)
    else:
        done.set_result(result)
