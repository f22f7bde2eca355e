"""Service logic in process, fast: the real hypernetwork, tokenizer and caches, a fake engine (named so).

The same services run over HTTP against the real vLLM engine in test_server.py; these cover
what is hard to provoke there (cancellation, folder pruning, damaged entries, crashes
mid-save) and the request path itself in seconds: a request in, a typed result out.
"""
from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
import torch

from hypergen.adapter import Adapter
from hypergen.base_model import load_tokenizer
from hypergen.engines import Engine, EngineBusy, GenerationChunk
from hypergen.errors import HypergenError
from hypergen.settings import Settings
from hypergen.task import Demo, Task
from hypergen.train_state import has_state
from server.adapters import AdapterService, private_dir
from server.cache import CacheEntry, MemoryCache
from server.errors import ApiError
from server.generation import GenerationService, Stream
from server.metrics import Metrics
from server.generator_process import FailedInChild, GeneratorProcessError
from server.schemas import AdapterOut, GenerateManyOut, GenerateOut, GenerateRequest

TASK = Task("Answer with the antonym of the given word.", (Demo("hot", "cold"), Demo("up", "down")))
OTHER = Task("Answer with the synonym of the given word.", (Demo("big", "large"),))


class FakeEngine(Engine):
    """Answers every request with the name of the adapter it got ('base' without one), one
    character per chunk; records removals and the requests it saw."""

    name = "fake"

    def __init__(self) -> None:
        self.removed: list[str] = []
        self.requests: list = []

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def generate(self, request):  # noqa: ANN001
        self.requests.append(request)
        text = request.adapter.name[:8] if request.adapter else "base"
        for char in text:
            yield GenerationChunk(char)
        yield GenerationChunk("", True, "stop", len(text), 1.0)

    async def remove_adapter(self, name: str) -> None:
        self.removed.append(name)

    async def resident_adapters(self) -> int:
        return 0

    def ready(self) -> bool:
        return True


@pytest.fixture(scope="module")
def tokenizer(generator):
    return load_tokenizer(generator.base_model)


def service(generator, folder: Path, tokenizer=None, **kwargs) -> AdapterService:
    return AdapterService(generator, tokenizer, MemoryCache(10**9), None, folder, FakeEngine(), Metrics(), **kwargs)


def generation(generator, tokenizer, folder: Path, **settings) -> GenerationService:
    adapters = service(generator, folder, tokenizer)
    return GenerationService(adapters.engine, tokenizer, adapters, Settings(**settings), adapters.metrics, "base")


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
        adapters.memory.put(wrong_key, CacheEntry(record.blob, {**record.meta.model_dump(), "adapter_id": wrong_key}))
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


def test_adapter_routes_go_through_the_service_and_get_typed_answers(generator, tokenizer, tmp_path):
    async def scenario():
        adapters = service(generator, tmp_path / "adapters", tokenizer)
        created = await adapters.create(TASK, warm=True)
        got = await adapters.get(created.adapter_id)
        with pytest.raises(ApiError) as malformed:
            await adapters.get("not-an-id")
        archive = await adapters.weights(created.adapter_id)
        await adapters.remove(created.adapter_id)
        with pytest.raises(ApiError) as gone:
            await adapters.remove(created.adapter_id)
        return adapters, created, got, malformed.value, archive, gone.value, await adapters.listed()

    adapters, created, got, malformed, archive, gone, listed = asyncio.run(scenario())
    assert isinstance(created, AdapterOut) and created.cached is False and got.cache_tier == "memory"
    assert got.instruction == TASK.instruction and "{input}" in got.prompt_template
    assert (malformed.status, malformed.field) == (422, "adapter_id") and (gone.status, gone.field) == (404, "adapter_id")
    assert archive[:2] == b"\x1f\x8b"  # gzip
    assert adapters.engine.removed == [created.adapter_id] * 2 and listed == []


def test_generate_inputs_answers_each_and_reports_the_one_that_does_not_fit(generator, tokenizer, tmp_path):
    gen = generation(generator, tokenizer, tmp_path / "adapters", max_prompt_tokens=200)
    body = GenerateRequest(task={"instruction": TASK.instruction, "demos": [{"input": "hot", "output": "cold"}]},
                           inputs=["fast", "word " * 400, "open"])
    out = asyncio.run(gen.generate(body))
    assert isinstance(out, GenerateManyOut)
    assert [r.error is None for r in out.results] == [True, False, True]
    assert out.results[1].error.code == "prompt_too_long" and out.results[1].error.field == "inputs.1"
    assert out.results[0].text == out.adapter_id[:8]  # the fake engine got this adapter
    assert out.usage.prompt_tokens == out.results[0].usage.prompt_tokens + out.results[2].usage.prompt_tokens
    assert gen._inflight == 0 and len(gen.engine.requests) == 2


def test_generate_on_the_base_model_and_a_stream_that_holds_its_slot(generator, tokenizer, tmp_path):
    gen = generation(generator, tokenizer, tmp_path / "adapters", max_concurrent_requests=1)

    async def scenario():
        base = await gen.generate(GenerateRequest(task={"instruction": "Say hi."}, input="x", use_adapter=False))
        stream = await gen.generate(GenerateRequest(prompt="hello", stream=True))
        with pytest.raises(EngineBusy):  # the stream holds the only slot until it ends
            await gen.generate(GenerateRequest(prompt="hello"))
        events = [e async for e in stream.events]
        stream.slot.release()
        after = await gen.generate(GenerateRequest(prompt="hello"))
        return base, stream, events, after

    base, stream, events, after = asyncio.run(scenario())
    assert isinstance(base, GenerateOut) and base.text == "base" and base.adapter_id is None
    assert isinstance(stream, Stream) and "".join(e["text"] for e in events) == "base" and events[-1]["done"]
    assert after.text == "base" and gen._inflight == 0


def test_a_demo_pool_gives_each_input_the_adapter_of_the_demos_it_picks(generator, tokenizer, tmp_path):
    pool = [{"input": "What is the capital of Italy?", "output": "Rome"}, {"input": "What is the capital of Spain?", "output": "Madrid"},
            {"input": "Seven plus five", "output": "12"}, {"input": "Nine minus four", "output": "5"}]
    body = GenerateRequest.model_validate({
        "task": {"instruction": "Answer.", "demo_pool": pool, "select": {"k": 2}},
        "inputs": ["What is the capital of France?", "What is the capital of Peru?", "Two plus two"], "max_tokens": 4})
    service = generation(generator, tokenizer, tmp_path / "adapters")
    out = asyncio.run(service.generate(body))
    assert isinstance(out, GenerateManyOut)
    ids = [r.adapter_id for r in out.results]
    assert ids[0] == ids[1] != ids[2] and out.adapter_id is None  # two selections: two adapters
    assert [r.text for r in out.results] == [i[:8] for i in ids]  # each input ran on its own (the fake answers its name)
    assert service.adapters.metrics.hypernetwork_runs._value.get() == 2
    capitals = Task("Answer.", tuple(Demo(d["input"], d["output"]) for d in pool[:2]))
    assert ids[0] == generator.task_hash(capitals)  # the id of the task with the picked demos: cached like any


class SlowGenerator:
    """The real generator, made slow on purpose (a run longer than the cross-replica lock's TTL)."""

    def __init__(self, inner, delay_s: float) -> None:
        self.inner, self.delay_s = inner, delay_s

    def __getattr__(self, name):  # noqa: ANN001, ANN204
        return getattr(self.inner, name)

    def generate_many(self, tasks):  # noqa: ANN001, ANN201
        time.sleep(self.delay_s)
        return self.inner.generate_many(tasks)


class BatchRecordingGenerator(SlowGenerator):
    """The real generator, slow on purpose, noting the size of every batch it is given; a task
    whose instruction starts with "poison" makes any batch holding it fail."""

    def __init__(self, inner, delay_s: float) -> None:  # noqa: ANN001
        super().__init__(inner, delay_s)
        self.batches: list[int] = []

    def generate_many(self, tasks):  # noqa: ANN001, ANN201
        self.batches.append(len(tasks))
        if any(t.instruction.startswith("poison") for t in tasks):
            raise HypergenError("this task cannot be generated", "instruction")
        return super().generate_many(tasks)


class FailingProcess:
    """A generator process (fake) whose every call fails with ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def generate_many(self, tasks, task_hashes):  # noqa: ANN001, ANN201
        raise self.error


@pytest.mark.parametrize("error, counted", [(FailedInChild("TaskError: bad task"), 0), (GeneratorProcessError("died"), 1)])
def test_misses_are_made_here_when_the_process_fails_and_only_its_own_failures_count(generator, tmp_path, error, counted):
    adapters = service(generator, tmp_path / "adapters")
    adapters.generator_process = FailingProcess(error)
    record = asyncio.run(adapters.get_or_create(TASK))
    assert record.adapter_id == generator.task_hash(TASK)  # made in this process instead
    assert adapters.metrics.generator_fallbacks._value.get() == counted


def test_a_batch_that_fails_in_a_sound_process_is_retried_one_by_one_not_as_a_batch_here(generator, tmp_path):
    tasks = [Task(f"Answer with word number {i} of the input.", (Demo("a b c", "a"),)) for i in range(3)]
    recording = BatchRecordingGenerator(generator, 0.3)

    async def scenario():
        adapters = service(recording, tmp_path / "adapters")
        adapters.generator_process = FailingProcess(FailedInChild("TaskError: bad task"))
        first = asyncio.ensure_future(adapters.get_or_create(tasks[0]))
        await asyncio.sleep(0.1)  # the first miss runs alone: the other two queue as one batch
        return [await first, *await asyncio.gather(*(adapters.get_or_create(t) for t in tasks[1:]))]

    records = asyncio.run(scenario())
    assert [r.adapter_id for r in records] == [generator.task_hash(t) for t in tasks]
    assert recording.batches == [1, 1, 1]  # each task made here once, alone; the failed batch of 2 not rerun here


def test_misses_that_arrive_together_are_generated_in_one_batch_with_the_bytes_of_single_runs(generator, tmp_path):
    tasks = [Task(f"Answer with word number {i} of the input.", (Demo("a b c", "a"),)) for i in range(6)]
    recording = BatchRecordingGenerator(generator, 0.5)  # the first batch runs while the rest arrive

    async def scenario():
        adapters = service(recording, tmp_path / "adapters")
        return adapters, await asyncio.gather(*(adapters.get_or_create(t) for t in tasks))

    adapters, records = asyncio.run(scenario())
    assert sum(recording.batches) == 6 and len(recording.batches) <= 2  # not six single passes
    assert adapters.metrics.generation_batch_size._sum.get() == 6
    assert [r.adapter_id for r in records] == [generator.task_hash(t) for t in tasks]  # each miss got its own adapter
    for task, record in zip(tasks, records):
        alone = generator.generate(task)
        batched = Adapter.from_bytes(record.blob)
        for key, tensor in alone.tensors.items():
            torch.testing.assert_close(batched.tensors[key], tensor, rtol=1e-4, atol=1e-5)  # float rounding only


def test_a_task_that_fails_in_a_batch_fails_alone(generator, tmp_path):
    good = [Task(f"Answer with word number {i} of the input.", (Demo("a b c", "a"),)) for i in range(3)]
    poison = Task("poison: this one fails in the hypernetwork")
    recording = BatchRecordingGenerator(generator, 0.3)

    async def scenario():
        adapters = service(recording, tmp_path / "adapters")
        first = asyncio.ensure_future(adapters.get_or_create(good[0]))
        await asyncio.sleep(0.1)  # the first batch (good[0] alone) is running: the rest queue as one batch
        rest = await asyncio.gather(*(adapters.get_or_create(t) for t in (good[1], poison, good[2])), return_exceptions=True)
        return [await first, *rest]

    first, second, failed, third = asyncio.run(scenario())
    assert isinstance(failed, HypergenError) and failed.field == "instruction"
    assert [r.adapter_id for r in (first, second, third)] == [generator.task_hash(t) for t in good]
    assert recording.batches == [1, 3, 1, 1, 1]  # the failed batch, then its tasks one by one


def test_a_run_longer_than_the_lock_ttl_is_not_started_twice_in_the_fleet(generator, tmp_path, redis_prefix):
    """Two replicas (services) on the real Redis; the lock lives 1 s, the run takes 3.5 s: the
    holder renews it, so the second replica waits for the result instead of running it again."""
    from server.cache import RedisCache

    async def scenario():
        prefix = f"{redis_prefix}lock-{os.getpid()}-{time.time_ns()}:"
        replicas = [service(SlowGenerator(generator, 3.5), tmp_path / name, lock_ttl_ms=1000) for name in ("one", "two")]
        for replica in replicas:
            replica.redis = RedisCache("redis://127.0.0.1:6379/0", prefix, 60)
        first = asyncio.ensure_future(replicas[0].get_or_create(TASK))
        await asyncio.sleep(0.2)  # the first holds the lock and is generating
        second = await replicas[1].get_or_create(TASK)
        made = await first
        for replica in replicas:
            await replica.redis.close()
        return replicas, made, second

    replicas, made, second = asyncio.run(scenario())
    assert second.adapter_id == made.adapter_id and second.tier == "redis"
    assert [r.metrics.hypernetwork_runs._value.get() for r in replicas] == [1, 0]


class LockWatchingGenerator(SlowGenerator):
    """Notes, when it runs, whether another replica's lock on the task is still alive."""

    def __init__(self, inner, redis_client, lock_key: str) -> None:  # noqa: ANN001
        super().__init__(inner, 0.0)
        self.redis_client, self.lock_key, self.lock_alive_at_run = redis_client, lock_key, []

    def generate_many(self, tasks):  # noqa: ANN001, ANN201
        self.lock_alive_at_run.append(bool(self.redis_client.exists(self.lock_key)))
        return self.inner.generate_many(tasks)


def test_a_replica_that_dies_holding_the_lock_is_taken_over_once_its_lock_lapses(generator, tmp_path, redis_prefix, redis_client):
    """A replica took the lock and died (no renewal, no release); another asked for the same task
    waits while the lock lives, then runs the hypernetwork itself, once."""
    from server.cache import RedisCache

    adapter_id = generator.task_hash(TASK)

    async def scenario():
        prefix = f"{redis_prefix}dead-{os.getpid()}-{time.time_ns()}:"
        dead = RedisCache("redis://127.0.0.1:6379/0", prefix, 60)
        assert await dead.acquire_lock(adapter_id, 1500) is not None  # ...and then it died
        watcher = LockWatchingGenerator(generator, redis_client, dead._key("lock", adapter_id))
        survivor = service(watcher, tmp_path / "survivor", lock_ttl_ms=1500)
        survivor.redis = RedisCache("redis://127.0.0.1:6379/0", prefix, 60)
        record = await survivor.get_or_create(TASK)
        for cache in (dead, survivor.redis):
            await cache.close()
        return survivor, watcher, record

    survivor, watcher, record = asyncio.run(scenario())
    assert record.adapter_id == adapter_id
    assert watcher.lock_alive_at_run == [False]  # it ran once, and only after the dead replica's lock lapsed
    assert survivor.metrics.hypernetwork_runs._value.get() == 1


def test_a_delete_refused_while_redis_restarts_still_holds_once_it_is_back(generator, tmp_path, own_redis):
    """Replica two holds an adapter in memory; Redis goes away as replica one deletes it (503:
    the others could not be told). When Redis returns, two's follower finds it missed
    announcements and drops what Redis no longer has: no replica serves the adapter."""
    from server.cache import RedisCache

    async def scenario():
        one, two = service(generator, tmp_path / "one"), service(generator, tmp_path / "two")
        for replica in (one, two):
            replica.redis = RedisCache(own_redis.url, "fleet:", 60)
            replica.redis.backoff_s = 0.2
        followers = [asyncio.create_task(r.follow_deletes()) for r in (one, two)]
        made = await one.get_or_create(TASK)
        assert (await two.get_or_create(TASK)).tier == "redis" and two.memory.get(made.adapter_id) is not None
        own_redis.stop()
        with pytest.raises(ApiError) as refused:
            await one.remove(made.adapter_id)
        own_redis.start()
        for _ in range(300):  # the follower resubscribes after its back-off
            if two.memory.get(made.adapter_id) is None:
                break
            await asyncio.sleep(0.1)
        with pytest.raises(ApiError) as gone:
            await two.require(made.adapter_id)
        for task in followers:
            task.cancel()
        for replica in (one, two):
            await replica.redis.close()
        return refused.value, gone.value

    refused, gone = asyncio.run(scenario())
    assert (refused.status, refused.code) == (503, "fleet_unreachable")
    assert (gone.status, gone.code) == (404, "adapter_not_found")


def test_an_entry_in_the_older_hash_layout_is_a_miss_and_is_overwritten(generator, tmp_path, redis_prefix, redis_client):
    """Redis entries were one hash (blob, meta) before they became two strings: a replica of this
    version reads such an entry as a miss, generates, and the strings replace the hash."""
    from server.cache import RedisCache

    prefix = f"{redis_prefix}layout-{os.getpid()}-{time.time_ns()}:"
    adapter_id = generator.task_hash(TASK)
    old = generator.generate(TASK).to_bytes()
    redis_client.hset(f"{prefix}adapter:{adapter_id}", mapping={"blob": old, "meta": "{}"})

    async def scenario():
        replica = service(generator, tmp_path / "one")
        replica.redis = RedisCache("redis://127.0.0.1:6379/0", prefix, 60)
        made = await replica.get_or_create(TASK)
        found = await replica.redis.get(adapter_id)
        await replica.redis.close()
        return replica, made, found

    replica, made, found = asyncio.run(scenario())
    assert made.tier is None and replica.metrics.hypernetwork_runs._value.get() == 1  # generated, not served
    assert redis_client.type(f"{prefix}adapter:{adapter_id}") == b"string"
    assert found is not None and found.blob == made.blob and found.meta["adapter_id"] == adapter_id
    assert 0 < redis_client.ttl(f"{prefix}blob:{adapter_id}") <= 60
