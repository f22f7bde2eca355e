"""Refine jobs: fine-tune an adapter on a user's examples in a worker process, tracked by id.

``POST /adapters/{id}/refine`` answers 202 with a job; ``GET /jobs/{id}`` follows it;
``DELETE /jobs/{id}`` cancels it.

- Each job runs ``hypergen.refine`` in a process of its own (spawned), so neither the event
  loop nor the engine ever waits on training. At most ``max_refine_jobs`` train at once on a
  replica, ``max_queued_jobs`` more wait; past that, 503 + Retry-After.
- The refined adapter's id is a hash of the parent id, the examples and the parameters: the
  same request gives the same adapter, and once it is cached the job is done at once. It is an
  ordinary adapter (cache tiers, weights, /generate, OpenAI routes), naming its parent.
- Job state lives in Redis when configured (any replica answers GET and takes a DELETE, which
  the owning replica carries out), in memory otherwise. Progress (steps done, the last loss)
  comes from the run's ``log.jsonl``, written by the training loop at every step.
- A replica that dies mid-job stops refreshing its jobs' heartbeat; a queued or running job
  whose heartbeat is older than ``STALE_S`` reads ``failed`` with the code ``interrupted``.
  Jobs are not resumed elsewhere: the request is cheap to send again, and gives the same id.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import multiprocessing
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from hypergen.adapter import Adapter, save_peft_blob
from hypergen.engines import EngineBusy
from hypergen.errors import HypergenError
from hypergen.evaluate import exact_match, rouge_l
from hypergen.prompts import first_line
from hypergen.settings import Settings
from hypergen.task import Demo, canonical_json
from hypergen.training_loop import LOG_FILE
from server.adapters import AdapterRecord, AdapterService
from server.cache import RedisCache
from server.errors import ApiError
from server.generation import GenerationService, Result, Target
from server.schemas import AdapterMeta, ErrorBody, HoldoutScores, JobOut, RefineRequest, SamplingIn, utc_now
from server.tenants import can_read, scoped_id

log = logging.getLogger(__name__)

POLL_S = 0.5  # how often a running job's progress is read and its state written
STALE_S = 30.0  # a queued or running job not refreshed for this long belonged to a replica that died
FINISHED = ("done", "failed", "cancelled")
HOLDOUT_TOKENS = 32


class JobRecord(JobOut):
    """A job as stored: what GET answers, plus the owner's heartbeat and a cancel request."""

    heartbeat: float = 0.0
    cancel_requested: bool = False
    tenant: str | None = None  # the key that started it (with API keys): no other key sees the job

    def answer(self) -> JobOut:
        if self.status not in FINISHED and time.time() - self.heartbeat > STALE_S:
            return JobOut(**{**self.public(), "status": "failed",
                             "error": ErrorBody(code="interrupted", message="the replica running this job stopped; send the request again")})
        return JobOut(**self.public())

    def public(self) -> dict[str, Any]:
        return self.model_dump(include=set(JobOut.model_fields))


def refined_id(parent_id: str, body: RefineRequest) -> str:
    """Same parent, examples and parameters: same adapter."""
    spec = {"parent": parent_id, "examples": [e.model_dump() for e in body.examples], "steps": body.steps,
            "lr": body.lr, "kind": "refine/1"}  # holdout examples are only scored: they do not change the adapter
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()


@dataclass
class JobService:
    adapters: AdapterService
    generation: GenerationService
    redis: RedisCache | None
    settings: Settings
    work_root: Path
    _local: dict[str, JobRecord] = field(default_factory=dict, init=False)  # this replica's jobs
    _tasks: dict[str, asyncio.Task] = field(default_factory=dict, init=False)  # queued or running here
    _slots: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self._slots = asyncio.Semaphore(self.settings.max_refine_jobs)

    # --- what the routes call -------------------------------------------------

    async def submit(self, parent_id: str, body: RefineRequest, tenant: str | None = None) -> JobOut:
        parent = await self.adapters.require(parent_id, "adapter_id", tenant)
        job_id, target_id = uuid.uuid4().hex, scoped_id(refined_id(parent_id, body), tenant)
        now = utc_now()
        job = JobRecord(
            job_id=job_id, status="queued", parent_id=parent_id, adapter_id=target_id, steps_total=body.steps,
            created_at=now, updated_at=now, heartbeat=time.time(), tenant=tenant,
            links={"self": f"/jobs/{job_id}", "parent": f"/adapters/{parent_id}"},
        )
        cached = await self.adapters.lookup(target_id)
        if cached is not None and can_read(cached.meta, tenant):  # the same request ran before: answered from the cache
            await self._finish(job, "done", adapter=cached, steps_done=body.steps)
            return job.answer()
        if self.adapters.tenants is not None:
            await self.adapters.tenants.check_room(tenant)
        if len(self._tasks) >= self.settings.max_refine_jobs + self.settings.max_queued_jobs:
            raise EngineBusy(f"{len(self._tasks)} refine jobs are running or queued on this replica; retry later")
        await self._save(job)
        task = self._tasks[job_id] = asyncio.create_task(self._run(job, parent, body))
        task.add_done_callback(lambda _: self._tasks.pop(job_id, None))
        return job.answer()

    async def get(self, job_id: str, tenant: str | None = None) -> JobOut:
        return (await self._require(job_id, tenant)).answer()

    async def cancel(self, job_id: str, tenant: str | None = None) -> JobOut:
        """Cancels and deletes a queued or running job (on whichever replica runs it); answers its
        last state. A job that has finished cannot be cancelled (409); a cancelled one is gone (404)."""
        job = await self._require(job_id, tenant)
        answer = job.answer()
        if answer.status in FINISHED:
            raise ApiError(409, "job_finished", f"the job is already {answer.status}", "job_id")
        if job_id in self._tasks:
            await self._finish(self._local[job_id], "cancelled")
            self._tasks[job_id].cancel()
            return self._local[job_id].answer()
        job.cancel_requested = True  # the owning replica sees it at its next poll
        job.status, job.updated_at = "cancelled", utc_now()
        await self._save(job)
        return job.answer()

    # --- running ------------------------------------------------------------

    async def _run(self, job: JobRecord, parent: AdapterRecord, body: RefineRequest) -> None:
        work = self.work_root / job.job_id
        process, holds_slot = None, False
        try:
            holds_slot = await self._wait_for_slot(job)
            if not holds_slot:
                return
            job.status = "running"
            await self._save(job)
            save_peft_blob(parent.blob, work / "parent")
            spec = {"work_dir": str(work), "instruction": parent.instruction, "steps": body.steps, "lr": body.lr,
                    "examples": [e.model_dump() for e in body.examples]}
            process = multiprocessing.get_context("spawn").Process(target=run_job, args=(spec,), daemon=True)
            process.start()
            while process.is_alive():
                await asyncio.sleep(POLL_S)
                self._read_progress(job, work)
                if await self._cancel_requested(job):
                    process.terminate()
                    await self._finish(job, "cancelled")
                    return
                await self._save(job)
            process.join()
            self._read_progress(job, work)
            if process.exitcode != 0:
                await self._finish(job, "failed", error=_child_error(work, process.exitcode))
                return
            record = await self._store(job, parent, len(body.examples), work)
            holdout = await self._holdout(parent, record, body.holdout) if body.holdout else None
            await self._finish(job, "done", adapter=record, holdout=holdout)
        except asyncio.CancelledError:
            if process is not None and process.is_alive():
                process.terminate()
            raise
        except Exception as exc:  # a job failing never takes the server with it
            log.exception("refine job %s failed", job.job_id)
            await self._finish(job, "failed", error=ErrorBody(code="refine_failed", message=f"{type(exc).__name__}: {exc}"))
        finally:
            if holds_slot:
                self._slots.release()
            shutil.rmtree(work, ignore_errors=True)

    async def _wait_for_slot(self, job: JobRecord) -> bool:
        """Waits its turn, refreshing its heartbeat so other replicas see it alive; False if
        it was cancelled meanwhile (no slot taken)."""
        while True:
            try:
                await asyncio.wait_for(self._slots.acquire(), STALE_S / 3)
            except TimeoutError:
                if await self._cancel_requested(job):
                    await self._finish(job, "cancelled")
                    return False
                await self._save(job)
                continue
            if job.status in FINISHED:  # cancelled while it waited
                self._slots.release()
                return False
            return True

    def _read_progress(self, job: JobRecord, work: Path) -> None:
        log_path = work / "run" / LOG_FILE
        try:
            lines = log_path.read_text().splitlines()
        except FileNotFoundError:
            return
        if lines:
            last = json.loads(lines[-1])
            job.steps_done, job.loss = int(last["step"]), round(float(last["loss"]), 4)

    async def _cancel_requested(self, job: JobRecord) -> bool:
        if job.status == "cancelled":
            return True
        stored = await self._load(job.job_id)
        return stored is not None and stored.cancel_requested

    async def _store(self, job: JobRecord, parent: AdapterRecord, n_examples: int, work: Path) -> AdapterRecord:
        refined = Adapter.load_peft(work / "refined")
        refined.base_model, refined.task_hash = parent.meta.base_model, job.adapter_id
        blob = refined.to_bytes()
        meta = AdapterMeta(**{
            **parent.meta.model_dump(), "adapter_id": job.adapter_id, "size_bytes": len(blob), "num_demos": n_examples,
            "created_at": utc_now(), "parent_id": parent.adapter_id, "owner": job.tenant, "public": False, "composition": None,
        })
        return await self.adapters.store(blob, meta)

    async def _holdout(self, parent: AdapterRecord, refined: AdapterRecord, examples: list) -> dict[str, HoldoutScores]:
        """Greedy answers of the parent and the refined adapter on the held-out examples, scored."""
        scores = {}
        for name, record in (("before", parent), ("after", refined)):
            target = Target(record, record.instruction, 0.0)
            greedy = SamplingIn(max_tokens=HOLDOUT_TOKENS, temperature=0.0)
            batch = [await self.generation.prepare(self.generation.input_ids(target, e.input), target, greedy) for e in examples]
            results = await self.generation.run_many(batch)
            answers = [first_line(r.text) if isinstance(r, Result) else "" for r in results]
            scores[name] = HoldoutScores(
                exact_match=round(100 * sum(exact_match(a, [e.output]) for a, e in zip(answers, examples)) / len(examples), 2),
                rougeL=round(100 * sum(rouge_l(a, [e.output]) for a, e in zip(answers, examples)) / len(examples), 2),
            )
        return scores

    async def _finish(self, job: JobRecord, status: str, *, adapter: AdapterRecord | None = None,
                      error: ErrorBody | None = None, holdout: dict | None = None, steps_done: int | None = None) -> None:
        if job.status in FINISHED:
            return
        job.status = status
        job.error = error
        job.holdout = holdout
        if steps_done is not None:
            job.steps_done = steps_done
        if adapter is not None:
            job.adapter = self.adapters.describe(adapter)
            job.links.adapter = f"/adapters/{adapter.adapter_id}"
        await self._save(job)

    # --- state ----------------------------------------------------------------

    async def _save(self, job: JobRecord) -> None:
        job.updated_at, job.heartbeat = utc_now(), time.time()
        self._local[job.job_id] = job
        if self.redis is not None:
            await self.redis.put_record("job", job.job_id, job.model_dump_json())

    async def _load(self, job_id: str) -> JobRecord | None:
        if self.redis is not None:
            raw = await self.redis.get_record("job", job_id)
            if raw is not None:
                try:
                    return JobRecord.model_validate_json(raw)
                except ValidationError:
                    log.warning("dropping unreadable job record %s", job_id)
        return self._local.get(job_id)

    async def _require(self, job_id: str, tenant: str | None = None) -> JobRecord:
        job = await self._load(job_id)
        # cancelled: the record stays only to tell its replica to stop; another key's: as if unknown
        if job is None or job.status == "cancelled" or (tenant is not None and job.tenant != tenant):
            raise ApiError(404, "job_not_found", f"no job {job_id}", "job_id")
        return job

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _child_error(work: Path, exitcode: int | None) -> ErrorBody:
    try:
        return ErrorBody(**json.loads((work / "error.json").read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return ErrorBody(code="refine_failed", message=f"the worker process exited with code {exitcode}")


def run_job(spec: dict[str, Any]) -> None:
    """In the worker process: refine the parent folder on the examples, write the refined folder.

    Failures are written to ``error.json`` (code, message, field) for the job to report.
    """
    from hypergen.refine import refine

    work = Path(spec["work_dir"])
    try:
        adapter = Adapter.load_peft(work / "parent")
        examples = [Demo(e["input"], e["output"]) for e in spec["examples"]]
        refined = refine(adapter, examples, instruction=spec["instruction"], steps=spec["steps"], lr=spec["lr"], work_dir=work / "run")
        refined.save_peft(work / "refined")
    except HypergenError as exc:
        (work / "error.json").write_text(json.dumps({"code": exc.code, "message": exc.message, "field": exc.field}))
        sys.exit(1)
    except Exception as exc:  # reported through the job, not lost in a log
        (work / "error.json").write_text(json.dumps({"code": "refine_failed", "message": f"{type(exc).__name__}: {exc}"}))
        sys.exit(1)
