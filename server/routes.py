"""The native API: adapters, generation, health and metrics. Thin: each route delegates to a service."""
from __future__ import annotations

import json
import logging
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Path, Request, Response
from starlette.convertors import StringConvertor, register_url_convertor
from fastapi.responses import StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from hypergen.task import TASK_HASH_PATTERN
from server.generation import Slot, Stream, task_from
from server.schemas import (
    AdapterOut, AdapterRequest, ComposeRequest, ErrorOut, GenerateManyOut, GenerateOut, GenerateRequest, JobOut, RefineRequest,
)
from server.state import ServerState, caller, get_state



def errors(*codes: int) -> dict[int | str, dict]:
    """The error statuses a route can answer with (401, 429 and 503 apply to every routed call)."""
    return {code: {"model": ErrorOut} for code in sorted({401, 429, 503, *codes})}


WITH_BODY = errors(400, 413, 422)  # malformed JSON, body or token limits, invalid fields
router = APIRouter(dependencies=[Depends(caller)])
health = APIRouter()
log = logging.getLogger(__name__)
class AdapterSegment(StringConvertor):
    """An adapter id's path segment: any text but ``compose``, which names its own resource
    (malformed ids still reach the route, which answers 422 naming the field)."""

    regex = "(?!compose$)[^/]+"


register_url_convertor("adapter", AdapterSegment())
AdapterIdPath = Path(pattern=TASK_HASH_PATTERN, description="64 lower-case hex characters (the task hash).")
JobIdPath = Path(pattern=r"^[0-9a-f]{32}$", description="32 lower-case hex characters.")


@router.post("/adapters", response_model=AdapterOut, tags=["adapters"], responses=WITH_BODY)
async def create_adapter(body: AdapterRequest, state: ServerState = Depends(get_state), tenant: str | None = Depends(caller)) -> AdapterOut:
    """Generates (or finds in cache) the LoRA adapter for a task. The id is the task hash."""
    return await state.adapters.create(task_from(body), warm=body.options.warm, tenant=tenant, public=body.options.public)


@router.post("/adapters/compose", response_model=AdapterOut, tags=["adapters"], responses={**WITH_BODY, **errors(404)})
async def compose_adapters(body: ComposeRequest, state: ServerState = Depends(get_state), tenant: str | None = Depends(caller)) -> AdapterOut:
    """A weighted combination of adapters as a new adapter (id: a hash of the parts, weights,
    method and instruction); cached and served like any other."""
    return await state.adapters.compose(body.parts, body.method, body.instruction, tenant)


@router.get("/adapters/{adapter_id:adapter}", response_model=AdapterOut, tags=["adapters"], responses=errors(404, 422))
async def get_adapter(adapter_id: str = AdapterIdPath, state: ServerState = Depends(get_state), tenant: str | None = Depends(caller)) -> AdapterOut:
    """The adapter's metadata, with the prompt template for clients that build prompts themselves."""
    return await state.adapters.get(adapter_id, tenant)


@router.get(
    "/adapters/{adapter_id}/weights",
    tags=["adapters"],
    response_class=Response,
    responses={200: {"content": {"application/gzip": {}}, "description": "PEFT folder as .tar.gz"}, **errors(404, 422)},
)
async def get_adapter_weights(adapter_id: str = AdapterIdPath, state: ServerState = Depends(get_state), tenant: str | None = Depends(caller)) -> Response:
    """The PEFT adapter folder as a .tar.gz; unpack and pass to peft.PeftModel.from_pretrained."""
    return Response(
        await state.adapters.weights(adapter_id, tenant),
        media_type="application/gzip",
        headers={"Content-Disposition": f'attachment; filename="{adapter_id}.tar.gz"'},
    )


@router.delete("/adapters/{adapter_id:adapter}", status_code=204, tags=["adapters"], responses=errors(403, 404, 422))
async def delete_adapter(adapter_id: str = AdapterIdPath, state: ServerState = Depends(get_state), tenant: str | None = Depends(caller)) -> Response:
    await state.adapters.remove(adapter_id, tenant)
    return Response(status_code=204)


@router.post("/adapters/{adapter_id}/refine", status_code=202, response_model=JobOut, tags=["jobs"], responses={**WITH_BODY, **errors(404)})
async def refine_adapter(body: RefineRequest, adapter_id: str = AdapterIdPath, state: ServerState = Depends(get_state), tenant: str | None = Depends(caller)) -> JobOut:
    """Starts a job that fine-tunes the adapter on your examples; follow it at ``links.self``.

    The refined adapter's id (``adapter_id``) is known at once: a hash of this adapter, the
    examples and the parameters, so the same request gives the same adapter (from cache).
    """
    return await state.jobs.submit(adapter_id, body, tenant)


@router.get("/jobs/{job_id}", response_model=JobOut, tags=["jobs"], responses=errors(404, 422))
async def get_job(job_id: str = JobIdPath, state: ServerState = Depends(get_state), tenant: str | None = Depends(caller)) -> JobOut:
    """Status (queued, running, done, failed, cancelled), steps done, the last loss; the adapter when done."""
    return await state.jobs.get(job_id, tenant)


@router.delete("/jobs/{job_id}", response_model=JobOut, tags=["jobs"], responses=errors(404, 409, 422))
async def cancel_job(job_id: str = JobIdPath, state: ServerState = Depends(get_state), tenant: str | None = Depends(caller)) -> JobOut:
    """Cancels and deletes a queued or running job, answering its last state (409 once it has finished)."""
    return await state.jobs.cancel(job_id, tenant)


@router.post(
    "/generate",
    response_model=GenerateOut | GenerateManyOut,
    tags=["generation"],
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "JSON (GenerateManyOut for 'inputs'), or server-sent events when stream is true"},
        **WITH_BODY, **errors(404),
    },
)
async def generate(body: GenerateRequest, state: ServerState = Depends(get_state), tenant: str | None = Depends(caller)):
    """Generates with an adapter (by id, or from an inline task) or the base model.

    ``input``/``inputs`` are answered in the task's own prompt (what the adapter was trained on);
    ``prompt``/``messages`` are sent raw.
    """
    body.check_shape()
    out = await state.generation.generate(body, tenant)
    return sse(out) if isinstance(out, Stream) else out


def sse(stream: Stream) -> StreamingResponse:
    """Server-sent events. The slot, taken before the response starts, is given back by the
    response however it ends, even when the client left before the first byte and the body never ran."""

    async def body() -> AsyncIterator[bytes]:
        try:
            try:
                async for event in stream.events:
                    yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()
            except Exception:  # the status line is sent: end the stream with an error event, not a broken one
                log.exception("generation failed mid-stream")
                error = {"error": {"code": "generation_failed", "message": "the engine failed while streaming", "field": None}}
                yield f"data: {json.dumps(error)}\n\n".encode()
            if stream.done_marker:
                yield b"data: [DONE]\n\n"
        finally:
            stream.slot.release()

    return SlotResponse(stream.slot, body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


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
    """Ready when the engine is loaded; 'degraded' (still 200) while Redis is configured but unreachable.
    ``generating_in``: "process" while the generator process makes adapters, "server" while the
    server makes them itself (the process is off, or failed and a new one is not ready yet)."""
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
        "generating_in": state.adapters.generating_in,
    }


@health.get("/metrics", tags=["health"], response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    state: ServerState | None = getattr(request.app.state, "hypergen", None)
    if state is None:
        return Response(b"", media_type=CONTENT_TYPE_LATEST)
    state.metrics.adapters_resident.set(await state.engine.resident_adapters())
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
