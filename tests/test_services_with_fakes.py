"""Service logic in process, fast: the real hypernetwork and caches, a fake engine (named so).

The same services run over HTTP against the real vLLM engine in test_server.py; these cover
what is hard to provoke there: cancellation, folder pruning, damaged entries, crashes mid-save.
"""
from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from hypergen.task import Demo, Task
from hypergen.train_state import has_state
from server.adapters import AdapterService, private_dir
from server.cache import CacheEntry, MemoryCache
from server.engines import Engine
from server.metrics import Metrics

TASK = Task("Answer with the antonym of the given word.", (Demo("hot", "cold"), Demo("up", "down")))
OTHER = Task("Answer with the synonym of the given word.", (Demo("big", "large"),))


class FakeEngine(Engine):
    """Records removals; generates nothing (these tests never reach generation)."""

    name = "fake"

    def __init__(self) -> None:
        self.removed: list[str] = []

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def generate(self, request):  # noqa: ANN001
        raise NotImplementedError

    async def remove_adapter(self, name: str) -> None:
        self.removed.append(name)

    async def resident_adapters(self) -> int:
        return 0

    def ready(self) -> bool:
        return True


def service(generator, folder: Path, **kwargs) -> AdapterService:
    return AdapterService(generator, MemoryCache(10**9), None, folder, FakeEngine(), Metrics(), **kwargs)


def test_a_cancelled_creator_does_not_take_its_waiters_with_it(generator, tmp_path):
    async def scenario():
        adapters = service(generator, tmp_path / "adapters")
        creator = asyncio.ensure_future(adapters.get_or_create(TASK))
        await asyncio.sleep(0)  # the creator has started the hypernetwork run
        waiter = asyncio.ensure_future(adapters.get_or_create(TASK))
        await asyncio.sleep(0)
        creator.cancel()
        record = await waiter
        with pytest.raises(asyncio.CancelledError):
            await creator
        return adapters, record

    adapters, record = asyncio.run(scenario())
    assert record.adapter_id == generator.task_hash(TASK) and record.tier is None
    assert adapters.memory.get(record.adapter_id) is not None  # the result reached the cache too
    assert adapters.metrics.hypernetwork_runs._value.get() == 1


def test_an_entry_under_another_tasks_key_is_a_miss(generator, tmp_path):
    async def scenario():
        adapters = service(generator, tmp_path / "adapters")
        record = await adapters.get_or_create(TASK)
        wrong_key = generator.task_hash(OTHER)
        adapters.memory.put(wrong_key, CacheEntry(record.blob, {**record.meta, "adapter_id": wrong_key}))
        return adapters, await adapters.lookup(wrong_key)

    adapters, found = asyncio.run(scenario())
    assert found is None
    assert adapters.metrics.cache_corrupt.labels("memory")._value.get() == 1


def test_pruning_keeps_recent_folders_and_clears_crash_leftovers(generator, tmp_path):
    folder = tmp_path / "adapters"
    folder.mkdir()
    old = time.time() - 3600
    names = [f"{i:064x}" for i in range(5)]
    for i, name in enumerate(names):
        (folder / name).mkdir()
        os.utime(folder / name, (old + i, old + i))
    (folder / ".tmp-crashed").mkdir()
    os.utime(folder / ".tmp-crashed", (old, old))
    (folder / ".tmp-writing").mkdir()  # a writer at work right now
    os.utime(folder / names[0])  # used just now: the engine may be loading it
    service(generator, folder, max_adapter_dirs=2)  # prunes at start
    left = sorted(p.name for p in folder.iterdir())
    assert left == sorted([".tmp-writing", names[0], names[4]]), left


def test_the_adapter_folder_is_private(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    assert private_dir(shared).stat().st_mode & 0o777 == 0o700
    assert private_dir(tmp_path / "new" / "dir").stat().st_mode & 0o777 == 0o700
    (tmp_path / "link").symlink_to(shared)
    with pytest.raises(PermissionError):
        private_dir(tmp_path / "link")


def test_a_crash_between_the_renames_of_a_state_swap_loses_nothing(tmp_path):
    state = tmp_path / "state"
    old = tmp_path / "state.old"  # what swap_in leaves if it dies after moving the old state aside
    old.mkdir()
    (old / "trainer.json").write_text('{"step": 40}')
    assert has_state(state)
    assert (state / "trainer.json").read_text() == '{"step": 40}' and not old.exists()
