"""Generation: prompt -> token ids (chat template for messages) -> limits -> engine -> text.

Shared by the native /generate route and the OpenAI-compatible routes, so both
apply the same limits and admission control.
"""
from __future__ import annotations

import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator

from hypergen.errors import TaskError
from hypergen.settings import Settings
from hypergen.task import Task
from server.adapters import AdapterRecord, AdapterService, is_adapter_id
from server.engines import Engine, EngineBusy, GenerationChunk, GenerationRequest
from server.errors import ApiError
from server.metrics import Metrics
from server.schemas import Message, TaskIn


def task_from(body: TaskIn, prefix: str = "") -> Task:
    """Schema -> library Task; the library's checks name fields relative to the body."""
    try:
        return Task.from_dict(body.model_dump())
    except TaskError as exc:
        raise ApiError(422, exc.code, exc.message, f"{prefix}{exc.field}" if exc.field else prefix.rstrip(".") or None) from None


@dataclass
class Prepared:
    request: GenerationRequest
    adapter_id: str | None
    prompt_tokens: int
    adapter_ms: float


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

    # --- inputs -------------------------------------------------------------

    def prompt_ids(self, prompt: str | None, messages: list[Message] | None) -> list[int]:
        if (prompt is None) == (messages is None):
            raise ApiError(422, "invalid_request", "give exactly one of 'prompt' or 'messages'", "prompt")
        if messages is not None:
            chat = [m.model_dump() for m in messages]
            ids = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
            return list(ids)
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    async def adapter_for(self, adapter_id: str | None, task: TaskIn | None, field_name: str = "adapter_id") -> tuple[AdapterRecord | None, float]:
        """The record for an adapter id or an inline task (created on demand); None for the base model."""
        start = time.perf_counter()
        if adapter_id is not None and task is not None:
            raise ApiError(422, "invalid_request", "give at most one of 'adapter_id' or 'task'", "adapter_id")
        record = None
        if task is not None:
            record = await self.adapters.get_or_create(task_from(task, "task."))
        elif adapter_id is not None:
            record = await self.lookup(adapter_id, field_name)
        return record, (time.perf_counter() - start) * 1000

    async def lookup(self, adapter_id: str, field_name: str = "adapter_id") -> AdapterRecord:
        if not is_adapter_id(adapter_id):
            raise ApiError(422, "invalid_adapter_id", "an adapter id is 64 lower-case hex characters", field_name)
        record = await self.adapters.lookup(adapter_id)
        if record is None:
            raise ApiError(404, "adapter_not_found", f"no adapter {adapter_id}; create it with POST /adapters", field_name)
        return record

    async def prepare(
        self, prompt_ids: list[int], record: AdapterRecord | None, adapter_ms: float, max_tokens: int,
        temperature: float, top_p: float, stop: list[str], seed: int | None,
    ) -> Prepared:
        limit = self.settings.max_prompt_tokens
        if len(prompt_ids) > limit:
            raise ApiError(422, "prompt_too_long", f"the prompt is {len(prompt_ids)} tokens; the limit is {limit}", "prompt")
        if max_tokens > self.settings.max_tokens_limit:
            raise ApiError(422, "invalid_request", f"max_tokens is limited to {self.settings.max_tokens_limit}", "max_tokens")
        if len(prompt_ids) + max_tokens > self.settings.max_model_len:
            raise ApiError(
                422, "context_too_long",
                f"prompt ({len(prompt_ids)}) + max_tokens ({max_tokens}) exceeds the context of {self.settings.max_model_len}",
                "max_tokens",
            )
        loaded = await self.adapters.loaded(record) if record is not None else None
        request = GenerationRequest(
            request_id=uuid.uuid4().hex, prompt_token_ids=prompt_ids, max_tokens=max_tokens,
            temperature=temperature, top_p=top_p, stop=stop, seed=seed, adapter=loaded,
        )
        return Prepared(request, record.adapter_id if record else None, len(prompt_ids), adapter_ms)

    # --- running ------------------------------------------------------------

    @asynccontextmanager
    async def admitted(self) -> AsyncIterator[None]:
        """Bounds requests in the engine; past the bound the client gets 503 + Retry-After."""
        if self._inflight >= self.settings.max_concurrent_requests:
            self.metrics.rejected.inc()
            raise EngineBusy(f"the engine is serving {self._inflight} requests; retry shortly")
        if not self.engine.ready():
            raise EngineBusy("the engine is not ready")
        self._inflight += 1
        try:
            yield
        finally:
            self._inflight -= 1

    async def stream(self, prepared: Prepared) -> AsyncIterator[GenerationChunk]:
        """Engine chunks; call inside ``admitted()``. Updates token metrics and resident gauge."""
        async for chunk in self.engine.generate(prepared.request):
            if chunk.finished:
                self.metrics.generated_tokens.inc(chunk.completion_tokens)
            yield chunk
        self.metrics.adapters_resident.set(await self.engine.resident_adapters())

    async def run(self, prepared: Prepared) -> Result:
        parts: list[str] = []
        final = GenerationChunk("", True)
        async with self.admitted():
            start = time.perf_counter()
            async for chunk in self.stream(prepared):
                parts.append(chunk.text)
                if chunk.finished:
                    final = chunk
        return Result("".join(parts), final.finish_reason, final.completion_tokens, final.queue_ms, (time.perf_counter() - start) * 1000)
