"""The native API: adapters, generation, health and metrics. Thin: each route delegates to a service."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.responses import StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from hypergen.task import TASK_HASH_PATTERN
from server.adapters import AdapterRecord, AdapterService
from server.errors import ApiError
from server.generation import GenerationService, Prepared, Result, Slot, Target, task_from
from server.schemas import (
    AdapterOut, AdapterRequest, ErrorBody, ErrorOut, GenerateManyOut, GenerateOut, GenerateRequest, InputResult, usage,
)
from server.state import ServerState, get_state, require_api_key



def errors(*codes: int) -> dict[int | str, dict]:
    """The error statuses a route can answer with (401 and 503 apply to every routed call)."""
    return {code: {"model": ErrorOut} for code in sorted({401, 503, *codes})}


WITH_BODY = errors(400, 413, 422)  # malformed JSON, body or token limits, invalid fields
router = APIRouter(dependencies=[Depends(require_api_key)])
health = APIRouter()
log = logging.getLogger(__name__)
AdapterIdPath = Path(pattern=TASK_HASH_PATTERN, description="64 lower-case hex characters (the task hash).")


def adapter_out(record: AdapterRecord, gen: GenerationService) -> AdapterOut:
    base = f"/adapters/{record.adapter_id}"
    return AdapterOut(
        **{k: v for k, v in record.meta.items() if k in AdapterOut.model_fields},
        prompt_template=gen.prompt_template(record),
        cached=record.tier is not None,
        cache_tier=record.tier,
        links={"self": base, "weights": f"{base}/weights"},
    )


@router.post("/adapters", response_model=AdapterOut, tags=["adapters"], responses=WITH_BODY)
async def create_adapter(body: AdapterRequest, state: ServerState = Depends(get_state)) -> AdapterOut:
    """Generates (or finds in cache) the LoRA adapter for a task. The id is the task hash."""
    record = await state.adapters.get_or_create(task_from(body))
    if body.options.warm:
        await state.adapters.loaded(record)
    return adapter_out(record, state.generation)


@router.get("/adapters/{adapter_id}", response_model=AdapterOut, tags=["adapters"], responses=errors(404, 422))
async def get_adapter(adapter_id: str = AdapterIdPath, state: ServerState = Depends(get_state)) -> AdapterOut:
    """The adapter's metadata, with the prompt template for clients that build prompts themselves."""
    return adapter_out(await state.generation.lookup(adapter_id), state.generation)


@router.get(
    "/adapters/{adapter_id}/weights",
    tags=["adapters"],
    response_class=Response,
    responses={200: {"content": {"application/gzip": {}}, "description": "PEFT folder as .tar.gz"}, **errors(404, 422)},
)
async def get_adapter_weights(adapter_id: str = AdapterIdPath, state: ServerState = Depends(get_state)) -> Response:
    """The PEFT adapter folder as a .tar.gz; unpack and pass to peft.PeftModel.from_pretrained."""
    record = await state.generation.lookup(adapter_id)
    return Response(
        await asyncio.to_thread(AdapterService.weights_archive, record),
        media_type="application/gzip",
        headers={"Content-Disposition": f'attachment; filename="{adapter_id}.tar.gz"'},
    )


@router.delete("/adapters/{adapter_id}", status_code=204, tags=["adapters"], responses=errors(404, 422))
async def delete_adapter(adapter_id: str = AdapterIdPath, state: ServerState = Depends(get_state)) -> Response:
    if not await state.adapters.delete(adapter_id):
        raise ApiError(404, "adapter_not_found", f"no adapter {adapter_id}", "adapter_id")
    return Response(status_code=204)


@router.post(
    "/generate",
    response_model=GenerateOut | GenerateManyOut,
    tags=["generation"],
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "JSON (GenerateManyOut for 'inputs'), or server-sent events when stream is true"},
        **WITH_BODY, **errors(404),
    },
)
async def generate(body: GenerateRequest, state: ServerState = Depends(get_state)):
    """Generates with an adapter (by id, or from an inline task) or the base model.

    ``input``/``inputs`` are answered in the task's own prompt (what the adapter was trained on);
    ``prompt``/``messages`` are sent raw.
    """
    body.check_shape()
    gen = state.generation
    target = await gen.target(body.adapter_id, body.task, body.use_adapter)
    if body.inputs is not None:
        return await generate_many(gen, target, body)
    if body.input is not None:
        ids, field = gen.input_ids(target, body.input), "input"
    else:
        ids, field = gen.raw_ids(body.prompt, body.messages), "prompt" if body.prompt is not None else "messages"
    prepared = await gen.prepare(ids, target, body, field_name=field)
    if body.stream:
        return await sse(gen, prepared, native_events(gen, prepared))
    result = await gen.run(prepared)
    return GenerateOut(
        text=result.text,
        adapter_id=prepared.adapter_id,
        finish_reason=result.finish_reason,
        usage=usage(prepared.prompt_tokens, result.completion_tokens),
        timings={"adapter_ms": round(target.adapter_ms, 2), "queue_ms": round(result.queue_ms, 2), "generate_ms": round(result.generate_ms, 2)},
    )


async def generate_many(gen: GenerationService, target: Target, body: GenerateRequest) -> GenerateManyOut:
    """Every input into the engine together; an input that fails carries its error, the rest answer."""
    start = time.perf_counter()
    batch: list[Prepared | ApiError] = []
    for i, text in enumerate(body.inputs):
        try:
            batch.append(await gen.prepare(gen.input_ids(target, text), target, body, field_name=f"inputs.{i}"))
        except ApiError as exc:
            if exc.field != f"inputs.{i}":  # a request-wide problem (max_tokens): the whole request fails
                raise
            batch.append(exc)
    outcomes = await gen.run_many(batch)
    results: list[InputResult] = []
    prompt_total = completion_total = 0
    for item, outcome in zip(batch, outcomes):
        if isinstance(outcome, Result):
            prompt_total += item.prompt_tokens
            completion_total += outcome.completion_tokens
            results.append(InputResult(
                text=outcome.text, finish_reason=outcome.finish_reason, usage=usage(item.prompt_tokens, outcome.completion_tokens)
            ))
        else:
            results.append(InputResult(error=ErrorBody(code=outcome.code, message=outcome.message, field=outcome.field)))
    queue_ms = max((o.queue_ms for o in outcomes if isinstance(o, Result)), default=0.0)
    return GenerateManyOut(
        adapter_id=target.adapter_id,
        results=results,
        usage=usage(prompt_total, completion_total),
        timings={"adapter_ms": round(target.adapter_ms, 2), "queue_ms": round(queue_ms, 2),
                 "generate_ms": round((time.perf_counter() - start) * 1000, 2)},
    )


async def native_events(gen, prepared: Prepared) -> AsyncIterator[dict]:
    start = time.perf_counter()
    async for chunk in gen.stream(prepared):
        if chunk.text:
            yield {"text": chunk.text}
        if chunk.finished:
            yield {
                "text": "", "done": True, "adapter_id": prepared.adapter_id, "finish_reason": chunk.finish_reason,
                "usage": usage(prepared.prompt_tokens, chunk.completion_tokens).model_dump(),
                "timings": {"adapter_ms": round(prepared.target.adapter_ms, 2), "queue_ms": round(chunk.queue_ms, 2),
                            "generate_ms": round((time.perf_counter() - start) * 1000, 2)},
            }


async def sse(gen: GenerationService, prepared: Prepared, events: AsyncIterator[dict], done_marker: bool = False) -> StreamingResponse:
    """Server-sent events. The slot is taken before the response starts (so 503 stays possible)
    and given back by the response however it ends, even when the client left before the
    first byte and the body never ran."""
    slot = gen.admit()

    async def body() -> AsyncIterator[bytes]:
        try:
            try:
                async for event in events:
                    yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()
            except Exception:  # the status line is sent: end the stream with an error event, not a broken one
                log.exception("generation failed mid-stream")
                error = {"error": {"code": "generation_failed", "message": "the engine failed while streaming", "field": None}}
                yield f"data: {json.dumps(error)}\n\n".encode()
            if done_marker:
                yield b"data: [DONE]\n\n"
        finally:
            slot.release()

    return SlotResponse(slot, body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class SlotResponse(StreamingResponse):
    def __init__(self, slot: Slot, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.slot = slot

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001 (ASGI)
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()


@health.get("/healthz", tags=["health"])
async def healthz() -> dict:
    """Alive: the process answers."""
    return {"status": "ok"}


@health.get("/readyz", tags=["health"], responses={503: {"description": "Starting, or the engine is down"}})
async def readyz(request: Request, response: Response) -> dict:
    """Ready when the engine is loaded; 'degraded' (still 200) while Redis is configured but unreachable."""
    state: ServerState | None = getattr(request.app.state, "hypergen", None)
    if state is None or not state.engine.ready():
        response.status_code = 503
        return {"status": "starting" if state is None else "engine_down", "engine": False, "redis": None}
    redis = None
    if state.redis is not None:
        redis = await state.redis.ping()
        state.metrics.redis_up.set(1 if redis else 0)
    status = "degraded" if redis is False else "ready"
    return {
        "status": status,
        "engine": state.engine.name,
        "redis": redis if redis is not None else "not configured",
        "base_model": state.base_name,
        "hypernetwork": state.generator.fingerprint,
        "hypernetwork_trained": state.generator.trained,
    }


@health.get("/metrics", tags=["health"], response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    state: ServerState | None = getattr(request.app.state, "hypergen", None)
    if state is None:
        return Response(b"", media_type=CONTENT_TYPE_LATEST)
    state.metrics.adapters_resident.set(await state.engine.resident_adapters())
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
