"""What the routes depend on, built once at start-up and reached through FastAPI dependencies."""
from __future__ import annotations

import hmac
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
from server.metrics import Metrics


@dataclass
class ServerState:
    settings: Settings
    generator: HyperGenerator
    engine: Engine
    adapters: AdapterService
    generation: GenerationService
    jobs: JobService
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


def require_api_key(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> None:
    """Bearer-token check when HYPERGEN_API_KEYS is set; open otherwise."""
    keys = request.app.state.settings.api_keys
    if not keys:
        return
    offered = credentials.credentials.encode() if credentials is not None else b""
    # Every key compared, in constant time each: the answer's timing says nothing about the keys.
    if credentials is None or not any([hmac.compare_digest(offered, key.encode()) for key in keys]):
        raise ApiError(401, "unauthorized", "a valid 'Authorization: Bearer <key>' header is required", None, {"WWW-Authenticate": "Bearer"})
