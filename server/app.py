"""The FastAPI application: built cheaply, loaded in the lifespan (generator, engine, caches)."""
from __future__ import annotations

import logging
import os
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI

from hypergen import __version__
from hypergen.settings import Settings, get_settings
from server.errors import install_error_handlers
from server.middleware import BodyLimitMiddleware, MetricsMiddleware
from server.openapi import install_openapi

log = logging.getLogger("hypergen.server")


def default_adapter_dir(settings: Settings) -> Path:
    """tmpfs when the host has one: adapters are re-creatable from the cache, so RAM is the right place."""
    if settings.adapter_dir is not None:
        return settings.adapter_dir.expanduser()
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm / f"hypergen-adapters-{os.getuid()}"
    return settings.resolved_home() / "adapters"


async def build_state(settings: Settings):
    """Loads everything the routes need. Slow (model + engine start); runs once per process."""
    import asyncio

    from hypergen.base_model import load_tokenizer, resolve_base_model
    from hypergen.generator import HyperGenerator
    from hypergen.engines import adapter_dtype, create_engine
    from server.adapters import AdapterService, private_dir
    from server.cache import MemoryCache, RedisCache
    from server.generator_process import GeneratorProcess
    from server.generation import GenerationService
    from server.jobs import JobService
    from server.metrics import Metrics
    from server.state import ServerState
    from server.tenants import Tenants

    stored = adapter_dtype(settings)
    generator = await asyncio.to_thread(
        HyperGenerator.from_pretrained, settings.checkpoint, settings.base_model, settings.device, settings.generator_dtype, stored
    )
    base_name = generator.base_model
    process = engine = redis = None
    try:
        if settings.generator_process and settings.device == "cpu":  # loads beside the engine's start; warm_up waits for it
            process = GeneratorProcess(settings.checkpoint, settings.base_model, settings.device, settings.generator_dtype, stored)
            process.start()
        model_path = resolve_base_model(base_name)
        tokenizer = load_tokenizer(base_name)
        max_rank = max(settings.max_lora_rank or 0, generator.spec.rank)
        engine = create_engine(settings, model_path, max_rank)
        await engine.start()
        metrics = Metrics()
        redis = RedisCache(settings.redis_url, settings.redis_prefix, settings.redis_ttl_s) if settings.redis_url else None
        if redis is not None and not await redis.ping():
            log.warning("redis at %s is unreachable; starting degraded", settings.redis_url)
        tenants = Tenants(settings, redis)
        adapters = AdapterService(
            generator, tokenizer, MemoryCache(settings.memory_cache_bytes), redis, default_adapter_dir(settings), engine, metrics,
            settings.max_adapter_dirs, max_rank, tenants, generator_process=process, max_batch=settings.generation_max_batch,
        )
        await adapters.warm_up()
        generation = GenerationService(engine, tokenizer, adapters, settings, metrics, base_name)
        adapter_dir = adapters.adapter_dir
        jobs = JobService(adapters, generation, redis, settings, private_dir(adapter_dir.with_name(adapter_dir.name + "-jobs")))
    except BaseException:  # a start that fails (engine, warm-up) leaves no child process, Redis client or engine behind
        if process is not None:
            process.close()
        if redis is not None:
            await redis.close()
        if engine is not None:
            await engine.shutdown()
        raise
    return ServerState(settings, generator, engine, adapters, generation, jobs, tenants, redis, metrics, base_name, int(time.time()))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    import asyncio

    state = await build_state(app.state.settings)
    app.state.hypergen = state
    following = asyncio.create_task(state.adapters.follow_deletes())  # deletes made on other replicas
    log.info("hypergen ready: engine=%s base=%s", state.engine.name, state.base_name)
    try:
        yield
    finally:
        following.cancel()
        app.state.hypergen = None
        await state.jobs.close()
        state.adapters.close()
        if state.redis is not None:
            await state.redis.close()
        await state.engine.shutdown()


def create_app(settings: Settings | None = None) -> FastAPI:
    from server import openai_routes, routes

    settings = settings or get_settings()
    app = FastAPI(
        title="hypergen",
        version=__version__,
        description="LoRA adapters generated on demand by a hypernetwork, served by a multi-LoRA engine.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.hypergen = None
    install_error_handlers(app)
    install_openapi(app, settings)
    app.include_router(routes.health)
    app.include_router(routes.router)
    app.include_router(openai_routes.router)
    app.add_middleware(MetricsMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    return app
