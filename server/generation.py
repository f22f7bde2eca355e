"""Generation: target (adapter + instruction) -> token ids -> limits -> engine -> text.

Token ids come from a raw prompt, a chat (the base model's template), or a task input
(the prompt the hypernetwork was trained with, from ``hypergen.prompts``).

Shared by the native /generate route and the OpenAI-compatible routes, so both
apply the same limits and admission control.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from hypergen import prompts
from hypergen.errors import TaskError
from hypergen.settings import Settings
from hypergen.task import Task
from server.adapters import AdapterRecord, AdapterService, is_adapter_id
from server.engines import Engine, EngineBusy, GenerationChunk, GenerationRequest
from server.errors import ApiError
from server.metrics import Metrics
from server.schemas import Message, SamplingIn, TaskIn

log = logging.getLogger(__name__)


def task_from(body: TaskIn, prefix: str = "") -> Task:
    """Schema -> library Task; the library's checks name fields relative to the body."""
    try:
        return Task.from_dict(body.model_dump())
    except TaskError as exc:
        raise ApiError(422, exc.code, exc.message, f"{prefix}{exc.field}" if exc.field else prefix.rstrip(".") or None) from None


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


class GenerationService:
    def __init__(self, engine: Engine, tokenizer: Any, adapters: AdapterService, settings: Settings, metrics: Metrics, base_name: str) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.adapters = adapters
        self.settings = settings
        self.metrics = metrics
        self.base_name = base_name
        self._inflight = 0

    # --- what to generate with ----------------------------------------------

    async def target(self, adapter_id: str | None, task: TaskIn | None, use_adapter: bool = True, field_name: str = "adapter_id") -> Target:
        """The adapter for an id or an inline task (created on demand), and its instruction.

        With ``use_adapter`` false the instruction is still looked up (prompts for 'input' are
        the same), but no adapter is created or loaded: the base model answers.
        """
        start = time.perf_counter()
        record, instruction = None, ""
        if task is not None:
            parsed = task_from(task, "task.")
            instruction = parsed.instruction
            if use_adapter:
                record = await self.adapters.get_or_create(parsed)
        elif adapter_id is not None:
            found = await self.lookup(adapter_id, field_name)
            instruction = found.instruction
            record = found if use_adapter else None
        return Target(record, instruction, (time.perf_counter() - start) * 1000)

    async def lookup(self, adapter_id: str, field_name: str = "adapter_id") -> AdapterRecord:
        if not is_adapter_id(adapter_id):
            raise ApiError(422, "invalid_adapter_id", "an adapter id is 64 lower-case hex characters", field_name)
        record = await self.adapters.lookup(adapter_id)
        if record is None:
            raise ApiError(404, "adapter_not_found", f"no adapter {adapter_id}; create it with POST /adapters", field_name)
        return record

    def prompt_template(self, record: AdapterRecord) -> str:
        return prompts.prompt_template(self.tokenizer, record.instruction)

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
