"""Generation: target (adapter + instruction) -> token ids -> limits -> engine -> text.

Token ids come from a raw prompt, a chat (the base model's template), or a task input
(the prompt the hypernetwork was trained with, from ``hypergen.prompts``).

Routes hand a request over and get a result (a response model, or a ``Stream`` holding
its engine slot); this service owns the adapter lookup, the limits, admission and timings.
Shared by the native /generate route and the OpenAI-compatible routes, so both
apply the same limits and admission control.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from hypergen import prompts
from hypergen.engines import Engine, EngineBusy, GenerationChunk, GenerationRequest
from hypergen.errors import TaskError
from hypergen.settings import Settings
from hypergen.selection import Selection
from hypergen.task import Demo, Task
from server.adapters import AdapterRecord, AdapterService
from server.errors import ApiError
from server.metrics import Metrics
from server.schemas import (
    ErrorBody, GenerateManyOut, GenerateOut, GenerateRequest, InputResult, Message, PooledTaskIn, SamplingIn, SelectIn, TaskIn,
    WeightedAdapter, usage,
)

log = logging.getLogger(__name__)


def task_from(body: TaskIn, prefix: str = "") -> Task:
    """Schema -> library Task; the library's checks name fields relative to the body."""
    try:
        return Task.from_dict(body.model_dump())
    except TaskError as exc:
        raise ApiError(422, exc.code, exc.message, f"{prefix}{exc.field}" if exc.field else prefix.rstrip(".") or None) from None


def timings(target: "Target", queue_ms: float, generate_ms: float) -> dict[str, float]:
    return {"adapter_ms": round(target.adapter_ms, 2), "queue_ms": round(queue_ms, 2), "generate_ms": round(generate_ms, 2)}


@dataclass
class Target:
    """What a request generates with: an adapter (None: the base model) and the task's instruction."""

    record: AdapterRecord | None
    instruction: str  # what prompts for 'input' are built with; "" when no task was named
    adapter_ms: float

    @property
    def adapter_id(self) -> str | None:
        return self.record.adapter_id if self.record else None


@dataclass
class Prepared:
    request: GenerationRequest
    target: Target
    prompt_tokens: int

    @property
    def adapter_id(self) -> str | None:
        return self.target.adapter_id


class Slot:
    """A place in the engine, given back exactly once however the request ends."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release: Callable[[], None] | None = release

    def release(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            release()

    def __del__(self) -> None:  # a last resort: a response dropped before it ever ran
        self.release()


@dataclass
class Result:
    text: str
    finish_reason: str | None
    completion_tokens: int
    queue_ms: float
    generate_ms: float


@dataclass
class Stream:
    """A streamed answer: its events, and the engine slot it holds until the stream ends."""

    slot: Slot
    events: AsyncIterator[dict]
    done_marker: bool = False  # OpenAI's closing 'data: [DONE]'


@dataclass
class GenerationService:
    """Requests in, results out: adapter lookup, prompt, limits, admission, engine, timings."""

    engine: Engine
    tokenizer: Any
    adapters: AdapterService
    settings: Settings
    metrics: Metrics
    base_name: str
    _inflight: int = field(default=0, init=False)

    # --- what to generate with ----------------------------------------------

    async def target(self, adapter_id: str | None, task: TaskIn | None, use_adapter: bool = True, field_name: str = "adapter_id",
                     adapters: list[WeightedAdapter] | None = None, tenant: str | None = None) -> Target:
        """The adapter for an id, an inline task (created on demand) or inline weighted adapters
        (composed on demand, linearly), and its instruction.

        With ``use_adapter`` false the instruction is still looked up (prompts for 'input' are
        the same), but no adapter is created or loaded: the base model answers.
        """
        start = time.perf_counter()
        record, instruction = None, ""
        if task is not None:
            parsed = task_from(task, "task.")
            instruction = parsed.instruction
            if use_adapter:
                record = await self.adapters.get_or_create(parsed, tenant)
        elif adapters is not None or adapter_id is not None:
            if adapters is not None:
                found = await self.adapters.composed(adapters, "linear", None, field_name="adapters", tenant=tenant)
            else:
                found = await self.adapters.require(adapter_id, field_name, tenant)
            instruction = found.instruction
            record = found if use_adapter else None
        return Target(record, instruction, (time.perf_counter() - start) * 1000)

    async def model_target(self, model: str, tenant: str | None = None) -> Target:
        """OpenAI's ``model``: the base model's name, or an adapter id (prompts stay raw)."""
        if model == self.base_name:
            return Target(None, "", 0.0)
        return await self.target(model, None, field_name="model", tenant=tenant)

    # --- prompts --------------------------------------------------------------

    def raw_ids(self, prompt: str | None, messages: list[Message] | None) -> list[int]:
        """A raw prompt is tokenised as is; messages go through the base model's chat template."""
        if messages is not None:
            chat = [m.model_dump() for m in messages]
            return list(self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False))
        return self.tokenizer(prompt or "", add_special_tokens=False)["input_ids"]

    def input_ids(self, target: Target, text: str) -> list[int]:
        """The prompt the hypernetwork was trained with, around one input (as ``hypergen eval`` does)."""
        return prompts.prompt_ids(self.tokenizer, target.instruction, text)

    async def prepare(self, ids: list[int], target: Target, sampling: SamplingIn, max_tokens: int | None = None, field_name: str = "prompt") -> Prepared:
        """Checks the limits (413 for token counts, 422 for fields) and loads the adapter for the engine.

        ``max_tokens`` overrides the body's (OpenAI's max_completion_tokens); an unset one is
        its default, lowered to the server's limit.
        """
        if max_tokens is None:
            max_tokens = sampling.max_tokens
            if "max_tokens" not in sampling.model_fields_set:
                max_tokens = min(max_tokens, self.settings.max_tokens_limit)
        limit = self.settings.max_prompt_tokens
        if len(ids) > limit:
            raise ApiError(413, "prompt_too_long", f"the prompt is {len(ids)} tokens; the limit is {limit}", field_name)
        if max_tokens > self.settings.max_tokens_limit:
            raise ApiError(422, "invalid_request", f"max_tokens is limited to {self.settings.max_tokens_limit}", "max_tokens")
        if len(ids) + max_tokens > self.settings.max_model_len:
            raise ApiError(
                413, "context_too_long",
                f"prompt ({len(ids)}) + max_tokens ({max_tokens}) exceeds the context of {self.settings.max_model_len}",
                field_name,
            )
        loaded = await self.adapters.loaded(target.record) if target.record is not None else None
        request = GenerationRequest(
            request_id=uuid.uuid4().hex, prompt_token_ids=ids, max_tokens=max_tokens, temperature=sampling.temperature,
            top_p=sampling.top_p, stop=sampling.stop_list(), seed=sampling.seed, adapter=loaded,
        )
        return Prepared(request, target, len(ids))

    # --- the native /generate ----------------------------------------------------

    async def generate(self, body: GenerateRequest, tenant: str | None = None) -> GenerateOut | GenerateManyOut | Stream:
        """One answer, answers for ``inputs``, or a stream: the whole native request in one call.

        ``input``/``inputs`` get the task's own prompt (what the adapter was trained on);
        ``prompt``/``messages`` go to the engine raw.
        """
        if body.task is not None and body.task.demo_pool is not None:
            targets = await self.pooled_targets(body.task, body.inputs or [body.input or ""], body.use_adapter, tenant)
        else:
            target = await self.target(body.adapter_id, body.task, body.use_adapter, adapters=body.adapters, tenant=tenant)
            targets = [target] * len(body.inputs or [None])
        if body.inputs is not None:
            return await self._generate_many(targets, body)
        target = targets[0]
        if body.input is not None:
            ids, field_name = self.input_ids(target, body.input), "input"
        else:
            ids, field_name = self.raw_ids(body.prompt, body.messages), "prompt" if body.prompt is not None else "messages"
        prepared = await self.prepare(ids, target, body, field_name=field_name)
        if body.stream:
            return self.open_stream(self._native_events(prepared))
        result = await self.run(prepared)
        return GenerateOut(
            text=result.text, adapter_id=prepared.adapter_id, finish_reason=result.finish_reason,
            usage=usage(prepared.prompt_tokens, result.completion_tokens),
            timings=timings(target, result.queue_ms, result.generate_ms),
        )

    async def pooled_targets(self, task: PooledTaskIn, inputs: list[str], use_adapter: bool, tenant: str | None) -> list[Target]:
        """Each input's target: the adapter of the task with the demos its pool picks for it
        (created on demand; inputs that pick the same demos share one)."""
        start = time.perf_counter()
        select = task.select or SelectIn()
        own, pool = ([Demo(d.input, d.output) for d in demos] for demos in (task.demos, task.demo_pool or []))
        try:
            tasks = await self.adapters.pool_tasks(task.instruction, own, pool, inputs, Selection(select.k, select.by, select.seed))
        except TaskError as exc:
            raise ApiError(422, exc.code, exc.message, f"task.{exc.field}" if exc.field else "task") from None
        records: dict[Task, AdapterRecord | None] = dict.fromkeys(tasks)
        if use_adapter:
            made = await asyncio.gather(*(self.adapters.get_or_create(t, tenant) for t in records))
            records = dict(zip(records, made))
        adapter_ms = (time.perf_counter() - start) * 1000
        return [Target(records[t], task.instruction, adapter_ms) for t in tasks]

    async def _generate_many(self, targets: list[Target], body: GenerateRequest) -> GenerateManyOut:
        """Every input into the engine together; an input that fails carries its error, the rest answer."""
        start = time.perf_counter()
        batch: list[Prepared | ApiError] = []
        for i, (text, target) in enumerate(zip(body.inputs or [], targets)):
            try:
                batch.append(await self.prepare(self.input_ids(target, text), target, body, field_name=f"inputs.{i}"))
            except ApiError as exc:
                if exc.field != f"inputs.{i}":  # a request-wide problem (max_tokens): the whole request fails
                    raise
                batch.append(exc)
        outcomes = await self.run_many(batch)
        results: list[InputResult] = []
        prompt_total = completion_total = 0
        for item, outcome in zip(batch, outcomes):
            if isinstance(outcome, Result) and isinstance(item, Prepared):
                prompt_total += item.prompt_tokens
                completion_total += outcome.completion_tokens
                results.append(InputResult(
                    text=outcome.text, finish_reason=outcome.finish_reason, usage=usage(item.prompt_tokens, outcome.completion_tokens),
                    adapter_id=item.adapter_id,
                ))
            elif isinstance(outcome, ApiError):
                results.append(InputResult(error=ErrorBody(code=outcome.code, message=outcome.message, field=outcome.field)))
        queue_ms = max((o.queue_ms for o in outcomes if isinstance(o, Result)), default=0.0)
        served = {t.adapter_id for t in targets}
        return GenerateManyOut(
            adapter_id=served.pop() if len(served) == 1 else None, results=results, usage=usage(prompt_total, completion_total),
            timings=timings(targets[0], queue_ms, (time.perf_counter() - start) * 1000),
        )

    async def _native_events(self, prepared: Prepared) -> AsyncIterator[dict]:
        start = time.perf_counter()
        async for chunk in self.stream(prepared):
            if chunk.text:
                yield {"text": chunk.text}
            if chunk.finished:
                yield {
                    "text": "", "done": True, "adapter_id": prepared.adapter_id, "finish_reason": chunk.finish_reason,
                    "usage": usage(prepared.prompt_tokens, chunk.completion_tokens).model_dump(),
                    "timings": timings(prepared.target, chunk.queue_ms, (time.perf_counter() - start) * 1000),
                }

    # --- running ------------------------------------------------------------

    def admit(self) -> Slot:
        """One of HYPERGEN_MAX_CONCURRENT_REQUESTS places in the engine; past them, 503 + Retry-After."""
        if self._inflight >= self.settings.max_concurrent_requests:
            self.metrics.rejected.inc()
            raise EngineBusy(f"the engine is serving {self._inflight} requests; retry shortly")
        if not self.engine.ready():
            raise EngineBusy("the engine is not ready")
        self._inflight += 1
        self.metrics.in_engine.set(self._inflight)
        return Slot(self._release)

    def _release(self) -> None:
        self._inflight -= 1
        self.metrics.in_engine.set(self._inflight)

    @asynccontextmanager
    async def admitted(self) -> AsyncIterator[None]:
        slot = self.admit()
        try:
            yield
        finally:
            slot.release()

    def open_stream(self, events: AsyncIterator[dict], done_marker: bool = False) -> Stream:
        """Takes the engine slot now (so 503 is still possible) for a stream the response will run."""
        return Stream(self.admit(), events, done_marker)

    async def stream(self, prepared: Prepared) -> AsyncIterator[GenerationChunk]:
        """Engine chunks; call inside ``admitted()``. Updates token metrics and resident gauge."""
        async for chunk in self.engine.generate(prepared.request):
            if chunk.finished:
                self.metrics.generated_tokens.inc(chunk.completion_tokens)
            yield chunk
        self.metrics.adapters_resident.set(await self.engine.resident_adapters())

    async def _collect(self, prepared: Prepared) -> Result:
        parts: list[str] = []
        final = GenerationChunk("", True)
        start = time.perf_counter()
        async for chunk in self.stream(prepared):
            parts.append(chunk.text)
            if chunk.finished:
                final = chunk
        return Result("".join(parts), final.finish_reason, final.completion_tokens, final.queue_ms, (time.perf_counter() - start) * 1000)

    async def run(self, prepared: Prepared) -> Result:
        async with self.admitted():
            return await self._collect(prepared)

    async def run_many(self, batch: list[Prepared | ApiError]) -> list[Result | ApiError]:
        """Every prepared input into the engine at once (it batches them); one admission slot.

        Entries that failed to prepare pass through; one that fails in the engine becomes an
        error of its own, so the others' answers are kept.
        """
        async def one(item: Prepared | ApiError) -> Result | ApiError:
            if isinstance(item, ApiError):
                return item
            try:
                return await self._collect(item)
            except Exception as exc:  # the engine failed this input only; report it in its entry
                log.warning("input failed in the engine: %s", exc)
                return ApiError(500, "generation_failed", f"the engine failed on this input ({type(exc).__name__})")

        async with self.admitted():
            return list(await asyncio.gather(*(one(item) for item in batch)))
