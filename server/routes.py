"""The native API: adapters, generation, health and metrics. Thin: each route delegates to a service."""
from __future__ import annotations

import json
import time
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.adapters import AdapterRecord, AdapterService, is_adapter_id
from server.errors import ApiError
from server.generation import Prepared, task_from
from server.schemas import AdapterOut, AdapterRequest, ErrorOut, GenerateOut, GenerateRequest
from server.state import ServerState, get_state, require_api_key

ERRORS = {code: {"model": ErrorOut} for code in (401, 404, 413, 422, 503)}
router = APIRouter(dependencies=[Depends(require_api_key)], responses=ERRORS)
health = APIRouter()


def adapter_out(record: AdapterRecord) -> AdapterOut:
    base = f"/adapters/{record.adapter_id}"
    return AdapterOut(
        **{k: v for k, v in record.meta.items() if k in AdapterOut.model_fields},
        cached=record.tier is not None,
        cache_tier=record.tier,
        links={"self": base, "weights": f"{base}/weights"},
    )


@router.post("/adapters", response_model=AdapterOut, tags=["adapters"])
async def create_adapter(body: AdapterRequest, state: ServerState = Depends(get_state)) -> AdapterOut:
    """Generates (or finds in cache) the LoRA adapter for a task. The id is the task hash."""
    record = await state.adapters.get_or_create(task_from(body))
    if body.options.warm:
        await state.adapters.loaded(record)
    return adapter_out(record)


@router.get("/adapters/{adapter_id}", response_model=AdapterOut, tags=["adapters"])
async def get_adapter(adapter_id: str, state: ServerState = Depends(get_state)) -> AdapterOut:
    return adapter_out(await state.generation.lookup(adapter_id))


@router.get(
    "/adapters/{adapter_id}/weights",
    tags=["adapters"],
    response_class=Response,
    responses={200: {"content": {"application/gzip": {}}, "description": "PEFT folder as .tar.gz"}},
)
async def get_adapter_weights(adapter_id: str, state: ServerState = Depends(get_state)) -> Response:
    """The PEFT adapter folder as a .tar.gz; unpack and pass to peft.PeftModel.from_pretrained."""
    record = await state.generation.lookup(adapter_id)
    return Response(
        AdapterService.weights_archive(record),
        media_type="application/gzip",
        headers={"Content-Disposition": f'attachment; filename="{adapter_id}.tar.gz"'},
    )


@router.delete("/adapters/{adapter_id}", status_code=204, tags=["adapters"])
async def delete_adapter(adapter_id: str, state: ServerState = Depends(get_state)) -> Response:
    if not is_adapter_id(adapter_id):
        raise ApiError(422, "invalid_adapter_id", "an adapter id is 64 lower-case hex characters", "adapter_id")
    if not await state.adapters.delete(adapter_id):
        raise ApiError(404, "adapter_not_found", f"no adapter {adapter_id}", "adapter_id")
    return Response(status_code=204)


@router.post(
    "/generate",
    response_model=GenerateOut,
    tags=["generation"],
    responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or server-sent events when stream is true"}},
)
async def generate(body: GenerateRequest, state: ServerState = Depends(get_state)):
    """Generates text with an adapter (by id, or from an inline task) or with the base model."""
    gen = state.generation
    ids = gen.prompt_ids(body.prompt, body.messages)
    record, adapter_ms = await gen.adapter_for(body.adapter_id, body.task)
    prepared = await gen.prepare(ids, record, adapter_ms, body.max_tokens, body.temperature, body.top_p, body.stop_list(), body.seed)
    if body.stream:
        return await sse(gen, prepared, native_events(gen, prepared))
    result = await gen.run(prepared)
    return GenerateOut(
        text=result.text,
        adapter_id=prepared.adapter_id,
        finish_reason=result.finish_reason,
        usage={"prompt_tokens": prepared.prompt_tokens, "completion_tokens": result.completion_tokens,
               "total_tokens": prepared.prompt_tokens + result.completion_tokens},
        timings={"adapter_ms": round(adapter_ms, 2), "queue_ms": round(result.queue_ms, 2), "generate_ms": round(result.generate_ms, 2)},
    )


async def native_events(gen, prepared: Prepared) -> AsyncIterator[dict]:
    start = time.perf_counter()
    async for chunk in gen.stream(prepared):
        if chunk.text:
            yield {"text": chunk.text}
        if chunk.finished:
            yield {
                "text": "", "done": True, "adapter_id": prepared.adapter_id, "finish_reason": chunk.finish_reason,
                "usage": {"prompt_tokens": prepared.prompt_tokens, "completion_tokens": chunk.completion_tokens,
                          "total_tokens": prepared.prompt_tokens + chunk.completion_tokens},
                "timings": {"adapter_ms": round(prepared.adapter_ms, 2), "queue_ms": round(chunk.queue_ms, 2),
                            "generate_ms": round((time.perf_counter() - start) * 1000, 2)},
            }


async def sse(gen, prepared: Prepared, events: AsyncIterator[dict], done_marker: bool = False) -> StreamingResponse:
    """Server-sent events; admission is taken before the response starts so 503 stays possible."""
    admission = gen.admitted()
    await admission.__aenter__()

    async def body() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()
            if done_marker:
                yield b"data: [DONE]\n\n"
        finally:
            await admission.__aexit__(None, None, None)

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@health.get("/healthz", tags=["health"])
async def healthz() -> dict:
    """Alive: the process answers."""
    return {"status": "ok"}


@health.get("/readyz", tags=["health"])
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


@health.get("/metrics", tags=["health"], response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    state: ServerState | None = getattr(request.app.state, "hypergen", None)
    if state is None:
        return Response(b"", media_type=CONTENT_TYPE_LATEST)
    state.metrics.adapters_resident.set(await state.engine.resident_adapters())
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
