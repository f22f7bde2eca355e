"""The adapter service: task -> task hash -> cache tiers -> hypernetwork -> adapter on disk.

This is the one place that decides where an adapter comes from. Single flight:
concurrent requests for one new task share one hypernetwork run within the
process (an asyncio future per hash) and across replicas (a short Redis lock
that the others wait on by polling for the finished entry).
"""
from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import shutil
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from hypergen import prompts
from hypergen.adapter import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, Adapter, save_peft_blob, verify_blob
from hypergen.compose import ComposeError, check_weights, compose, composed_rank, composition_id
from hypergen.errors import CorruptAdapterError
from hypergen.generator import HyperGenerator
from hypergen.selection import Selection
from hypergen.task import TASK_HASH_PATTERN, Demo, Task
from server.cache import CacheEntry, MemoryCache, RedisCache
from server.errors import ApiError
from server.generator_process import FailedInChild, GeneratorProcess, GeneratorProcessError, adapter_blobs
from server.miss_batches import Made, MissBatcher
from hypergen.engines import Engine, LoadedAdapter
from server.metrics import Metrics
from server.schemas import AdapterMeta, AdapterOut, Composition, WeightedAdapter, utc_now
from server.tenants import Tenants, can_delete, can_read, scoped_id

log = logging.getLogger(__name__)

ADAPTER_ID = re.compile(TASK_HASH_PATTERN)
LOCK_TTL_MS = 30_000  # renewed every third of it while the run lasts; a replica that dies lets it lapse
MAX_WAIT_S = 300.0
MAX_LISTED = 1000  # adapters /v1/models lists at most  # the longest a replica waits on another's (renewed) lock before computing itself
PRUNE_GRACE_S = 60.0  # a folder used this recently is never pruned: the engine may be loading it


def is_adapter_id(value: str) -> bool:
    return bool(ADAPTER_ID.fullmatch(value))


def private_dir(path: Path) -> Path:
    """Creates ``path`` readable by this user only; refuses one that another user owns.

    The default lives in world-writable /dev/shm under a predictable name: a folder someone
    else made there could hand the engine their adapters.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if path.is_symlink() or info.st_uid != os.getuid():
        raise PermissionError(f"{path} is not a folder of this user's; set HYPERGEN_ADAPTER_DIR to another place")
    if info.st_mode & 0o077:
        path.chmod(0o700)
    return path


@dataclass
class AdapterRecord:
    adapter_id: str
    blob: bytes
    meta: AdapterMeta
    tier: str | None  # where it was found: "memory", "redis", or None when just generated

    @property
    def instruction(self) -> str:
        """The task's instruction: what the prompt for an input needs (kept in every tier)."""
        return self.meta.instruction


@dataclass
class AdapterService:
    """Every adapter operation the routes need: create, look up, weights, delete, list."""

    generator: HyperGenerator
    tokenizer: Any  # renders each adapter's prompt template
    memory: MemoryCache
    redis: RedisCache | None
    adapter_dir: Path
    engine: Engine
    metrics: Metrics
    max_adapter_dirs: int = 512
    max_rank: int = 8  # the engine's largest LoRA rank: bounds what a composition may have
    tenants: Tenants | None = None  # owners and quotas (with API keys); every tenant argument is None without
    lock_ttl_ms: int = LOCK_TTL_MS
    generator_process: GeneratorProcess | None = None  # generates misses when set (server/generator_process.py)
    max_batch: int = 16  # misses generated in one pass at most (server/miss_batches.py)
    _inflight: dict[str, asyncio.Future[AdapterRecord]] = field(default_factory=dict, init=False)
    # One thread: the hypernetwork uses all cores itself; parallel runs would only contend.
    _executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="hypernet"), init=False
    )
    _batcher: MissBatcher = field(init=False)

    def __post_init__(self) -> None:
        private_dir(self.adapter_dir)
        self._prune_folders()  # also clears a crashed writer's .tmp-* folders
        self._batcher = MissBatcher(self._generated_blobs, self._executor, self.max_batch,
                                    self.metrics.generation_batch_size.observe)

    async def warm_up(self) -> None:
        """Waits for the generator process to load and warm up; without one (or if it cannot
        start), one made-up generation on the hypernetwork thread. Before the server says it is ready."""
        loop = asyncio.get_running_loop()
        if self.generator_process is not None:
            try:
                return await loop.run_in_executor(self._executor, self.generator_process.wait_ready)
            except GeneratorProcessError:
                pass  # logged where it failed; misses are generated here until a new child starts
        await loop.run_in_executor(self._executor, self.generator.warm_up)

    @property
    def generating_in(self) -> str:
        """Where the next miss is generated: "process" (the generator process) or "server"."""
        process = self.generator_process
        return "process" if process is not None and process.ready else "server"

    # --- what the routes call -------------------------------------------------

    async def create(self, task: Task, warm: bool = False, tenant: str | None = None, public: bool = False) -> AdapterOut:
        """The adapter for a task, generated or from a cache tier; ``warm`` also writes it for the engine."""
        record = await self.get_or_create(task, tenant, public)
        if warm:
            await self.loaded(record)
        return self.describe(record)

    async def compose(self, parts: list[WeightedAdapter], method: str, instruction: str | None, tenant: str | None = None) -> AdapterOut:
        return self.describe(await self.composed(parts, method, instruction, tenant=tenant))

    async def get(self, adapter_id: str, tenant: str | None = None) -> AdapterOut:
        return self.describe(await self.require(adapter_id, tenant=tenant))

    async def weights(self, adapter_id: str, tenant: str | None = None) -> bytes:
        """The PEFT folder as a .tar.gz (built off the event loop)."""
        return await asyncio.to_thread(weights_archive, await self.require(adapter_id, tenant=tenant))

    async def remove(self, adapter_id: str, tenant: str | None = None) -> None:
        """From every tier, the adapter folder and the engine; 404 when no tier had it (or the
        caller may not see it); 403 for a public adapter that another tenant owns."""
        if tenant is not None:
            record = await self.require(adapter_id, tenant=tenant)
            if not can_delete(record.meta, tenant):
                raise ApiError(403, "not_owner", "a public adapter can be deleted only by the key that made it", "adapter_id")
            if self.tenants is not None:
                await self.tenants.disowns(tenant, adapter_id)
        found = await self.delete(adapter_id)
        # Announced even when not found here: another replica may still hold it in memory.
        if self.redis is not None and not await self.redis.publish_delete(adapter_id):
            raise ApiError(503, "fleet_unreachable", "deleted on this replica, but Redis could not tell the others; "
                           "send the delete again", None, {"Retry-After": "1"})
        if not found:
            raise ApiError(404, "adapter_not_found", f"no adapter {adapter_id}", "adapter_id")

    async def listed(self, tenant: str | None = None, limit: int = MAX_LISTED) -> list[tuple[str, bool]]:
        """(adapter id, held by this replica) for the adapters the caller may use: this replica's
        memory (least recently used first), then the rest of the fleet's from Redis."""
        metas = {key: entry.meta for key in self.memory.keys() if (entry := self.memory.get(key)) is not None}
        held = set(metas)
        if self.redis is not None:
            for key, meta in ((await self.redis.metas(limit)) or {}).items():
                metas.setdefault(key, meta)
        visible = [key for key, meta in metas.items()
                   if tenant is None or meta.get("public") or meta.get("owner") == tenant]
        return [(key, key in held) for key in visible[:limit]]

    async def require(self, adapter_id: str, field_name: str = "adapter_id", tenant: str | None = None) -> AdapterRecord:
        """The record for an id from a request (422 for a malformed id, 404 for an unknown one or
        one the caller may not see: the same answer, so the two cannot be told apart)."""
        if not is_adapter_id(adapter_id):
            raise ApiError(422, "invalid_adapter_id", "an adapter id is 64 lower-case hex characters", field_name)
        record = await self.lookup(adapter_id)
        if record is None or not can_read(record.meta, tenant):
            raise ApiError(404, "adapter_not_found", f"no adapter {adapter_id}; create it with POST /adapters", field_name)
        return record

    def describe(self, record: AdapterRecord) -> AdapterOut:
        base = f"/adapters/{record.adapter_id}"
        return AdapterOut(
            **record.meta.model_dump(exclude={"owner"}),
            prompt_template=prompts.prompt_template(self.tokenizer, record.instruction),
            cached=record.tier is not None,
            cache_tier=record.tier,
            links={"self": base, "weights": f"{base}/weights"},
        )

    # --- lookup -------------------------------------------------------------

    def _record(self, tier: str, key: str, entry: CacheEntry | None) -> AdapterRecord | None:
        """The entry as a record when it is sound and this task's; counts the hit or miss."""
        if entry is None:
            self.metrics.cache_misses.labels(tier).inc()
            return None
        try:
            info = verify_blob(entry.blob)
            try:
                meta = AdapterMeta.model_validate(entry.meta)
            except ValidationError:
                raise CorruptAdapterError("the entry's metadata lacks fields this server needs") from None
            if info.get("task_hash") != key or meta.adapter_id != key:
                raise CorruptAdapterError("the entry is another task's adapter")
            config = info["peft_config"]
            if (meta.rank, meta.alpha, meta.target_modules) != (config["r"], config["lora_alpha"], config["target_modules"]):
                raise CorruptAdapterError("the entry's metadata disagrees with its adapter")
        except CorruptAdapterError:
            log.warning("dropping corrupt or outdated %s cache entry %s", tier, key)
            self.metrics.cache_corrupt.labels(tier).inc()
            self.metrics.cache_misses.labels(tier).inc()
            return None
        self.metrics.cache_hits.labels(tier).inc()
        return AdapterRecord(key, entry.blob, meta, tier)

    async def lookup(self, adapter_id: str) -> AdapterRecord | None:
        """Memory, then Redis (promoting to memory); a damaged entry is deleted and reads as a miss."""
        raw = self.memory.get(adapter_id)
        record = self._record("memory", adapter_id, raw)
        if record is not None:
            return record
        if raw is not None:
            self.memory.delete(adapter_id)
        if self.redis is None:
            return None
        raw = await self.redis.get(adapter_id)
        self.metrics.redis_up.set(1 if self.redis.available else 0)
        record = self._record("redis", adapter_id, raw)
        if record is None:
            if raw is not None:
                await self.redis.delete(adapter_id)
            return None
        self.memory.put(adapter_id, raw)
        return record

    # --- get or create ------------------------------------------------------

    async def get_or_create(self, task: Task, tenant: str | None = None, public: bool = False) -> AdapterRecord:
        adapter_id = scoped_id(self.generator.task_hash(task), tenant, public)
        record = await self.lookup(adapter_id)
        if record is not None and can_read(record.meta, tenant):
            return record
        pending = self._inflight.get(adapter_id)
        if pending is None:
            await self._check_room(tenant)
            # A task of its own: if the request that started it goes away, the work still finishes
            # for the others waiting on it, and for the cache.
            pending = asyncio.ensure_future(self._create(adapter_id, task, tenant, public))
            self._inflight[adapter_id] = pending
            pending.add_done_callback(lambda done: self._finished(adapter_id, done))
        return await asyncio.shield(pending)

    def _finished(self, adapter_id: str, done: asyncio.Future[AdapterRecord]) -> None:
        self._inflight.pop(adapter_id, None)
        if not done.cancelled():
            done.exception()  # retrieved here, so an error nobody waited for is not logged as lost

    async def _check_room(self, tenant: str | None) -> None:
        if self.tenants is not None:
            await self.tenants.check_room(tenant)

    async def _create(self, adapter_id: str, task: Task, owner: str | None = None, public: bool = False) -> AdapterRecord:
        token = None
        if self.redis is not None:
            token = await self.redis.acquire_lock(adapter_id, self.lock_ttl_ms)
            if token is None and self.redis.available:
                # Another replica is generating it: wait for its result rather than duplicate work
                # (or, if it releases its lock without a result or dies and lets it lapse, compute it here).
                found = await self.redis.wait_for(adapter_id, MAX_WAIT_S)
            else:
                # Double-checked: a replica may have finished between our miss and our lock.
                found = await self.redis.get(adapter_id) if token is not None else None
            record = self._record("redis", adapter_id, found) if found is not None else None
            if record is not None and can_read(record.meta, owner):
                if token is not None:
                    await self.redis.release_lock(adapter_id, token)
                self.memory.put(adapter_id, found)
                return record
        renewing = asyncio.create_task(self._keep_lock(adapter_id, token)) if token is not None else None
        try:
            start = time.perf_counter()
            blob, stages = await self._batcher.generate(task, adapter_id)
            self.metrics.hypernetwork_runs.inc()
            self.metrics.hypernetwork_seconds.observe(time.perf_counter() - start)
            for stage, ms in stages.items():
                self.metrics.generation_stage_seconds.labels(stage.removesuffix("_ms")).observe(ms / 1000)
            return await self.store(blob, self._generated_meta(task, adapter_id, blob, owner, public))
        finally:
            if renewing is not None:
                renewing.cancel()
            if token is not None:
                await self.redis.release_lock(adapter_id, token)

    async def _keep_lock(self, adapter_id: str, token: str) -> None:
        """Renews our lock while the run lasts, so a slow run is never started twice in the fleet."""
        while True:
            await asyncio.sleep(self.lock_ttl_ms / 3000)
            if not await self.redis.renew_lock(adapter_id, token, self.lock_ttl_ms):
                log.warning("lost the lock on %s while generating it; another replica may run it too", adapter_id)
                return

    async def store(self, blob: bytes, meta: AdapterMeta) -> AdapterRecord:
        """Puts an adapter (generated, composed, or a refine job's) in every tier; counts it as its owner's."""
        entry = CacheEntry(blob, meta.model_dump())
        self.memory.put(meta.adapter_id, entry)
        if self.redis is not None:
            await self.redis.put(meta.adapter_id, entry)
        if self.tenants is not None:
            await self.tenants.owns(meta.owner, meta.adapter_id)
        return AdapterRecord(meta.adapter_id, blob, meta, None)

    async def composed(self, parts: list[WeightedAdapter], method: str, instruction: str | None,
                       field_name: str = "parts", tenant: str | None = None) -> AdapterRecord:
        """The composition of existing adapters (from cache when made before), checked part by part.

        Errors name the part as ``{field_name}.{i}...``: "parts" for /adapters/compose, "adapters"
        for /generate's inline form.
        """
        try:
            check_weights([p.weight for p in parts])
            records = [await self.require(p.adapter_id, f"parts.{i}.adapter_id", tenant) for i, p in enumerate(parts)]
            first = records[0].meta
            for i, record in enumerate(records):
                if (record.meta.base_model, record.meta.hypernetwork) != (first.base_model, first.hypernetwork):
                    raise ComposeError("made for another base model or hypernetwork than the first part", f"parts.{i}.adapter_id")
            rank = composed_rank([r.meta.rank for r in records], method)
            if rank > self.max_rank:
                raise ComposeError(f"{method} gives rank {rank}; the engine takes at most {self.max_rank} "
                                   "(HYPERGEN_MAX_LORA_RANK); use linear or svd", "method")
        except (ComposeError, ApiError) as exc:
            exc.field = exc.field.replace("parts", field_name, 1) if exc.field else exc.field
            raise
        instruction = first.instruction if instruction is None else instruction
        weighted = [(p.adapter_id, p.weight) for p in parts]
        adapter_id = scoped_id(composition_id(weighted, method, instruction), tenant)
        record = await self.lookup(adapter_id)
        if record is not None and can_read(record.meta, tenant):
            return record
        await self._check_room(tenant)
        meta = first.model_copy(update={"owner": tenant, "public": False,
            "adapter_id": adapter_id, "instruction": instruction, "rank": rank, "num_demos": 0,
            "created_at": utc_now(), "parent_id": None, "composition": Composition(method=method, parts=parts),
        })
        adapter = await asyncio.to_thread(_composed, records, weighted, method, adapter_id)
        blob = await asyncio.to_thread(adapter.to_bytes)
        return await self.store(blob, meta.model_copy(update={"alpha": adapter.alpha, "size_bytes": len(blob)}))

    async def pool_tasks(self, instruction: str, own: list[Demo], pool: list[Demo], inputs: list[str], selection: Selection) -> list[Task]:
        """The task each input gets from a demo pool (the encoder runs on the hypernetwork's thread)."""
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, self.generator.selector.tasks_for, instruction, own, pool, inputs, selection)

    def _generated_meta(self, task: Task, adapter_id: str, blob: bytes, owner: str | None, public: bool) -> AdapterMeta:
        spec = self.generator.spec  # the generator process loads the same checkpoint
        return AdapterMeta(
            adapter_id=adapter_id, owner=owner, public=public, instruction=task.instruction, base_model=self.generator.base_model,
            hypernetwork=self.generator.fingerprint, rank=spec.rank, alpha=spec.alpha,
            target_modules=list(spec.target_modules), size_bytes=len(blob), num_demos=len(task.demos), created_at=utc_now(),
        )

    def _generated_blobs(self, tasks: list[Task], adapter_ids: list[str]) -> list[Made]:
        """A batch of misses' blobs and stage timings (ms), on the hypernetwork thread: from the
        generator process when there is one, else, or when it fails, here (a failed child costs
        speed, never the request). A batch that fails inside a sound child goes back to the
        batcher, which tries its tasks one by one: each is then made in the child or, failing
        there alone, once more here, and no batch runs twice."""
        if self.generator_process is not None:
            try:
                return self.generator_process.generate_many(tasks, adapter_ids)
            except FailedInChild as exc:  # the process is sound, so not counted as its failure
                if len(tasks) > 1:
                    raise  # the batcher retries these one by one in the child; only a lone task is retried here
                log.warning("a task failed in the generator process (%s); generating it here", exc)
            except GeneratorProcessError:
                self.metrics.generator_fallbacks.inc()
        return adapter_blobs(self.generator, tasks, adapter_ids)  # this thread is the generator's only caller in the server

    # --- engine side --------------------------------------------------------

    async def loaded(self, record: AdapterRecord) -> LoadedAdapter:
        """The adapter's PEFT folder (written once, atomically) for the engine to load.

        A folder in use has its time refreshed, so pruning removes the least recently used.
        """
        path = self.adapter_dir / record.adapter_id
        try:
            if not (path / PEFT_WEIGHTS_FILE).is_file():
                raise FileNotFoundError(path)
            os.utime(path)
        except FileNotFoundError:  # never written, or pruned / deleted just now
            await asyncio.to_thread(self._write_folder, record, path)
        return LoadedAdapter(record.adapter_id, path)

    def _write_folder(self, record: AdapterRecord, path: Path) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.adapter_dir))
        try:
            save_peft_blob(record.blob, tmp)
            try:
                os.replace(tmp, path)
            except OSError:  # another writer won the race; its folder is identical
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune_folders()

    def _prune_folders(self) -> None:
        """Keeps ``max_adapter_dirs`` folders, least recently used first out; none used in the last
        PRUNE_GRACE_S seconds (the engine may be about to load it), and no stale ``.tmp-*`` ones."""
        stale = time.time() - PRUNE_GRACE_S
        folders, leftovers = [], []
        for path in self.adapter_dir.iterdir():
            try:
                used = path.stat().st_mtime
            except FileNotFoundError:  # removed by another writer meanwhile
                continue
            if path.is_dir() and is_adapter_id(path.name):
                folders.append((used, path))
            elif path.name.startswith(".tmp-") and used < stale:
                leftovers.append(path)
        folders.sort()
        excess = [path for used, path in folders[: max(0, len(folders) - self.max_adapter_dirs)] if used < stale]
        for old in excess + leftovers:
            shutil.rmtree(old, ignore_errors=True)  # rewritten from the cache if asked for again

    async def delete(self, adapter_id: str) -> bool:
        found = await self._drop_local(adapter_id)
        if self.redis is not None:
            found = bool(await self.redis.delete(adapter_id)) or found
        return found

    async def _drop_local(self, adapter_id: str) -> bool:
        """This replica's copies: memory, folder, engine."""
        found = self.memory.delete(adapter_id)
        path = self.adapter_dir / adapter_id
        if path.exists():
            found = True
            shutil.rmtree(path, ignore_errors=True)
        await self.engine.remove_adapter(adapter_id)
        return found

    async def follow_deletes(self) -> None:
        """Drops what other replicas delete, as they announce it (runs for the server's life).

        After a gap in the subscription (Redis away), announcements may have been missed: every
        memory entry Redis no longer has is dropped too (re-created on demand; a refined adapter
        made while Redis was away is lost with it).
        """
        if self.redis is None:
            return
        async for adapter_id in self.redis.deleted_ids():
            try:
                if adapter_id is not None:
                    await self._drop_local(adapter_id)
                    continue
                for held in self.memory.keys():
                    if self.redis.available and not await self.redis.exists(held):
                        await self._drop_local(held)
            except Exception:  # one bad message never stops the follower
                log.exception("could not apply a delete announcement")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self.generator_process is not None:
            self.generator_process.close()


def _composed(records: list[AdapterRecord], weighted: list[tuple[str, float]], method: str, adapter_id: str) -> Adapter:  # blocking
    parts = [(Adapter.from_bytes(r.blob), weight) for r, (_, weight) in zip(records, weighted)]
    return compose(parts, method, task_hash=adapter_id)


def weights_archive(record: AdapterRecord) -> bytes:  # blocking: call through a thread
    """A .tar.gz of the PEFT folder (adapter_config.json + adapter_model.safetensors)."""
    with tempfile.TemporaryDirectory() as tmp:
        save_peft_blob(record.blob, tmp)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for name in (PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE):
                tar.add(Path(tmp) / name, arcname=f"{record.adapter_id}/{name}")
    return buf.getvalue()
