"""OpenAI-compatible routes: ``model`` is an adapter id or the base model's name.

Enough of the OpenAI API that the official client works unchanged for
completions, chat completions (both streaming) and model listing.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import APIRouter, Depends

from server.generation import GenerationService, Prepared
from server.routes import WITH_BODY, errors, sse
from server.schemas import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, OpenAISampling, usage
from server.state import ServerState, caller, get_state

router = APIRouter(prefix="/v1", dependencies=[Depends(caller)], tags=["openai"])


STREAMS = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or server-sent events when stream is true"}}


@dataclass(frozen=True)
class Shape:
    """How one OpenAI endpoint shapes its answer, whole and streamed; the rest is shared."""

    id_prefix: str
    object: str
    chunk_object: str
    chat: bool

    def choice(self, text: str, finish_reason: str | None) -> dict:
        if self.chat:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
        return {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}

    def delta(self, text: str, finish_reason: str | None) -> dict:
        if self.chat:
            return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish_reason}
        return self.choice(text, finish_reason)


COMPLETION = Shape("cmpl", "text_completion", "text_completion", chat=False)
CHAT = Shape("chatcmpl", "chat.completion", "chat.completion.chunk", chat=True)


async def _answer(state: ServerState, shape: Shape, body: OpenAISampling, ids: list[int], max_tokens: int | None, field_name: str,
                  tenant: str | None):
    """``model`` is the base model's name or an adapter id; prompts are raw (no task template)."""
    gen = state.generation
    prepared = await gen.prepare(ids, await gen.model_target(body.model, tenant), body, max_tokens, field_name=field_name)
    head = {"id": f"{shape.id_prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
    if body.stream:
        return sse(gen.open_stream(_chunks(gen, prepared, shape, head), done_marker=True))
    result = await gen.run(prepared)
    return {
        **head, "object": shape.object, "choices": [shape.choice(result.text, result.finish_reason)],
        "usage": usage(prepared.prompt_tokens, result.completion_tokens).model_dump(),
    }


async def _chunks(gen: GenerationService, prepared: Prepared, shape: Shape, head: dict) -> AsyncIterator[dict]:
    head = {**head, "object": shape.chunk_object}
    if shape.chat:  # the chat stream opens with the assistant's role
        yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    async for chunk in gen.stream(prepared):
        event = {**head, "choices": [shape.delta(chunk.text, chunk.finish_reason if chunk.finished else None)]}
        if chunk.finished:
            event["usage"] = usage(prepared.prompt_tokens, chunk.completion_tokens).model_dump()
        yield event


@router.post("/completions", responses={**STREAMS, **WITH_BODY, **errors(404)})
async def completions(body: CompletionRequest, state: ServerState = Depends(get_state), tenant: str | None = Depends(caller)):
    return await _answer(state, COMPLETION, body, state.generation.raw_ids(body.text(), None), None, "prompt", tenant)


@router.post("/chat/completions", responses={**STREAMS, **WITH_BODY, **errors(404)})
async def chat_completions(body: ChatCompletionRequest, state: ServerState = Depends(get_state), tenant: str | None = Depends(caller)):
    ids = state.generation.raw_ids(None, body.messages)
    return await _answer(state, CHAT, body, ids, body.max_completion_tokens, "messages", tenant)


@router.get("/models", response_model=ModelList, responses=errors())
async def models(state: ServerState = Depends(get_state), tenant: str | None = Depends(caller)) -> ModelList:
    """The base model, then the adapters the caller may use: this replica's (``held_here``), then the
    rest of the fleet's (from Redis; up to 1,000 in all)."""
    cards = [ModelCard(id=state.base_name, created=state.started_at)]
    for adapter_id, here in await state.adapters.listed(tenant):
        cards.append(ModelCard(id=adapter_id, created=state.started_at, held_here=here))
    return ModelList(data=cards)
