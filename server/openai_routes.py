"""OpenAI-compatible routes: ``model`` is an adapter id or the base model's name.

Enough of the OpenAI API that the official client works unchanged for
completions, chat completions (both streaming) and model listing.
"""
from __future__ import annotations

import time
import uuid
from typing import AsyncIterator

from fastapi import APIRouter, Depends

from server.generation import GenerationService, Prepared, Target
from server.routes import WITH_BODY, errors, sse
from server.schemas import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, OpenAISampling, usage
from server.state import ServerState, get_state, require_api_key

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["openai"])


async def _prepare(state: ServerState, body: OpenAISampling, ids: list[int], max_tokens: int | None, field_name: str) -> Prepared:
    """``model`` is the base model's name or an adapter id; prompts are raw (no task template)."""
    gen = state.generation
    target = Target(None, "", 0.0) if body.model == state.base_name else await gen.target(body.model, None, field_name="model")
    return await gen.prepare(ids, target, body, max_tokens, field_name=field_name)


STREAMS = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or server-sent events when stream is true"}}


@router.post("/completions", responses={**STREAMS, **WITH_BODY, **errors(404)})
async def completions(body: CompletionRequest, state: ServerState = Depends(get_state)):
    gen = state.generation
    prepared = await _prepare(state, body, gen.raw_ids(body.text(), None), None, "prompt")
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        return await sse(gen, prepared, _completion_chunks(gen, prepared, rid, created, body.model), done_marker=True)
    result = await gen.run(prepared)
    return {
        "id": rid, "object": "text_completion", "created": created, "model": body.model,
        "choices": [{"index": 0, "text": result.text, "finish_reason": result.finish_reason, "logprobs": None}],
        "usage": usage(prepared.prompt_tokens, result.completion_tokens).model_dump(),
    }


async def _completion_chunks(gen: GenerationService, prepared: Prepared, rid: str, created: int, model: str) -> AsyncIterator[dict]:
    async for chunk in gen.stream(prepared):
        choice = {"index": 0, "text": chunk.text, "finish_reason": chunk.finish_reason if chunk.finished else None, "logprobs": None}
        event = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}
        if chunk.finished:
            event["usage"] = usage(prepared.prompt_tokens, chunk.completion_tokens).model_dump()
        yield event


@router.post("/chat/completions", responses={**STREAMS, **WITH_BODY, **errors(404)})
async def chat_completions(body: ChatCompletionRequest, state: ServerState = Depends(get_state)):
    gen = state.generation
    prepared = await _prepare(state, body, gen.raw_ids(None, body.messages), body.max_completion_tokens, "messages")
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        return await sse(gen, prepared, _chat_chunks(gen, prepared, rid, created, body.model), done_marker=True)
    result = await gen.run(prepared)
    return {
        "id": rid, "object": "chat.completion", "created": created, "model": body.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text}, "finish_reason": result.finish_reason}],
        "usage": usage(prepared.prompt_tokens, result.completion_tokens).model_dump(),
    }


async def _chat_chunks(gen: GenerationService, prepared: Prepared, rid: str, created: int, model: str) -> AsyncIterator[dict]:
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
    yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    async for chunk in gen.stream(prepared):
        delta = {"content": chunk.text} if chunk.text else {}
        event = {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": chunk.finish_reason if chunk.finished else None}]}
        if chunk.finished:
            event["usage"] = usage(prepared.prompt_tokens, chunk.completion_tokens).model_dump()
        yield event


@router.get("/models", response_model=ModelList, responses=errors())
async def models(state: ServerState = Depends(get_state)) -> ModelList:
    """The base model, then the adapters this replica holds in memory (most recent last)."""
    cards = [ModelCard(id=state.base_name, created=state.started_at)]
    for adapter_id in state.adapters.held_ids():
        cards.append(ModelCard(id=adapter_id, created=state.started_at))
    return ModelList(data=cards)
