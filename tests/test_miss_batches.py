"""server/miss_batches.py on a fake run function (fakes: no hypernetwork, no server): who waits,
what forms a batch, and that every waiter gets an answer whatever the run does."""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

from hypergen.task import Task
from server.miss_batches import MissBatcher


def fake_run(batches: list[list[str]], release: threading.Event, short_by_one: bool = False):
    """A blocking run that records each batch's hashes, holds its first batch until ``release``,
    and answers each task with its hash as bytes (one answer short for batches of several, if asked)."""

    def run(tasks: list[Task], hashes: list[str]) -> list[tuple[bytes, dict[str, float]]]:
        batches.append(list(hashes))
        if len(batches) == 1:
            release.wait(5)
        made = [(h.encode(), {"encode_ms": 1.0}) for h in hashes]
        return made[:-1] if short_by_one and len(made) > 1 else made

    return run


def scenario(short_by_one: bool = False) -> tuple[list[list[str]], list, list[int]]:
    batches: list[list[str]] = []
    sizes: list[int] = []
    release = threading.Event()

    async def go():
        batcher = MissBatcher(fake_run(batches, release, short_by_one), ThreadPoolExecutor(1), max_batch=3, on_batch=sizes.append)
        first = asyncio.ensure_future(batcher.generate(Task("task 0"), "h0"))
        await asyncio.sleep(0.05)  # the first miss started alone, at once
        assert batches == [["h0"]]
        rest = [asyncio.ensure_future(batcher.generate(Task(f"task {i}"), f"h{i}")) for i in range(1, 6)]
        await asyncio.sleep(0.05)
        release.set()
        return await asyncio.gather(first, *rest, return_exceptions=True)

    return batches, asyncio.run(go()), sizes


def test_a_lone_miss_starts_at_once_and_the_queue_forms_batches_of_at_most_max_batch():
    batches, results, sizes = scenario()
    assert batches == [["h0"], ["h1", "h2", "h3"], ["h4", "h5"]]  # queued while the first ran; split at max_batch
    assert sizes == [1, 3, 2]
    assert [blob for blob, _ in results] == [f"h{i}".encode() for i in range(6)]  # each waiter its own answer


def test_a_run_that_answers_short_still_answers_every_waiter():
    batches, results, _ = scenario(short_by_one=True)
    assert [blob for blob, _ in results] == [f"h{i}".encode() for i in range(6)]
    assert ["h1"] in batches and ["h3"] in batches  # the short batch was redone task by task
