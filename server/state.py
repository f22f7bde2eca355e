"""What the routes depend on, built once at start-up and reached through FastAPI dependencies."""
from __future__ import annotations

from dataclasses import dataclass

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from hypergen.engines import Engine
from hypergen.generator import HyperGenerator
from hypergen.settings import Settings
from server.adapters import AdapterService
from server.cache import RedisCache
from server.errors import ApiError
from server.generation import GenerationService
from server.jobs import JobService
from server.tenants import Tenants
from server.metrics import Metrics


@dataclass
class ServerState:
    settings: Settings
    generator: HyperGenerator
    engine: Engine
    adapters: AdapterService
    generation: GenerationService
    jobs: JobService
    tenants: Tenants
    redis: RedisCache | None
    metrics: Metrics
    base_name: str
    started_at: int


def get_state(request: Request) -> ServerState:
    state = getattr(request.app.state, "hypergen", None)
    if state is None:
        raise ApiError(503, "starting", "the server is still starting", None, {"Retry-After": "5"})
    return state


_bearer = HTTPBearer(auto_error=False)


async def caller(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> str | None:
    """The tenant making the request (None when no API keys are set): 401 for a missing or wrong
    key, 429 past the key's requests-per-minute quota."""
    state = get_state(request)
    tenant = state.tenants.identify(credentials.credentials if credentials is not None else None)
    await state.tenants.admit(tenant)
    return tenant

