"""hypergen on Ray Serve: replicas of the server, requests for an adapter sent where it is loaded.

Two deployments. ``Replica`` runs the whole hypergen app (the FastAPI app of ``server.app``,
lifespan and all: hypernetwork, engine, caches) and answers HTTP requests handed to it as
plain values. ``Router`` is the HTTP ingress: it reads which adapter a request is for (the
``/adapters/{id}`` path, ``adapter_id`` in the body, or ``model`` on the OpenAI routes) and
calls a replica with that id as Ray Serve's *multiplexed model id*, so Ray sends requests for
one adapter to the replicas that already hold it (``@serve.multiplexed`` marks a replica as
holding an id once it has served it; least recently used ids are forgotten past
``max_cpu_loras``). Requests that name no adapter go to any replica. Redis is the shared tier,
as with compose: a replica that has never seen an adapter takes it from Redis, and deletes are
broadcast to every replica (``RedisCache.publish_delete``). Replicas autoscale on ongoing
requests when ``autoscaling`` is given; Ray restarts a replica that dies, and a request that
was on it is answered 503 ``replica_unavailable`` (send it again).

    hypergen serve --ray --replicas 2      # local Ray; RAY_ADDRESS=... joins a cluster
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from typing import Any, AsyncIterator

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from hypergen.task import TASK_HASH_PATTERN

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-hypergen-replica"
ADAPTER_PATH = re.compile(r"^/adapters/(?!compose$)([^/]+)")
ADAPTER_ID = re.compile(TASK_HASH_PATTERN)  # what an adapter id looks like (the task hash)
HELD_PER_REPLICA = 64  # adapter ids Ray remembers per replica for routing (the engine holds max_cpu_loras)


def adapter_of(path: str, body: bytes) -> str:
    """The adapter a request is for ('' when it names none): its path, or the body's adapter_id / model."""
    match = ADAPTER_PATH.match(path)
    if match:
        return match.group(1)
    if not body:
        return ""
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(data, dict):
        return ""
    for key in ("adapter_id", "model"):
        value = data.get(key)
        if isinstance(value, str) and ADAPTER_ID.match(value):
            return value
    return ""


@serve.deployment(health_check_period_s=10)
class Replica:
    """One hypergen server, driven through its ASGI interface (no socket of its own)."""

    def __init__(self, env: dict[str, str]) -> None:
        os.environ.update(env)  # the replica's HYPERGEN_* settings, as compose gives them
        from hypergen.settings import get_settings
        from server.app import create_app, default_adapter_dir

        self.name = serve.get_replica_context().replica_id.unique_id
        settings = get_settings()
        # replicas may share a host: each its own engine folder (a delete on one must not pull files from under another)
        own_dir = default_adapter_dir(settings) / f"replica-{self.name}"
        self.app = create_app(settings.model_copy(update={"adapter_dir": own_dir}))
        self._life: Any = None  # held: a lifespan nobody references is collected, which runs its shutdown
        self._starting: asyncio.Task | None = None

    async def _start(self) -> None:
        """Starts the app's lifespan once. Shielded: a caller that gives up (a readiness probe's
        timeout) must not cancel a start half-way, or the next call would start a second one
        beside threads the first left running (two model loads at once corrupt each other)."""
        if self._starting is None:
            self._life = self.app.router.lifespan_context(self.app)
            self._starting = asyncio.create_task(self._life.__aenter__())
        await asyncio.shield(self._starting)

    async def check_health(self) -> None:
        """Ray restarts a replica whose start or engine has failed."""
        if self._starting is None or not self._starting.done():
            return
        self._starting.result()  # raises what the start raised
        state = self.app.state.hypergen
        if state is None or not state.engine.ready():
            raise RuntimeError("hypergen engine is not ready")

    @serve.multiplexed(max_num_models_per_replica=HELD_PER_REPLICA)
    async def hold(self, adapter_id: str) -> str:
        """Marks this replica as holding ``adapter_id`` (the engine and caches do the real holding)."""
        return adapter_id

    async def call(self, method: str, path: str, query: str, headers: list[tuple[str, str]], body: bytes) -> AsyncIterator[Any]:
        """The app's response to one request: first (status, headers), then body chunks as they come."""
        await self._start()
        adapter_id = serve.get_multiplexed_model_id()
        if adapter_id:
            await self.hold(adapter_id)
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers], "client": ("ray-serve", 0),
            "server": ("hypergen", 80),
        }
        sent: asyncio.Queue = asyncio.Queue()
        done = asyncio.Event()
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        async def run() -> None:
            try:
                await self.app(scope, receive, sent.put)
            except Exception:  # noqa: BLE001 (the app logged it and answered 500; the replica itself is fine)
                pass
            finally:
                done.set()
                await sent.put(None)

        task = asyncio.create_task(run())
        try:
            while (message := await sent.get()) is not None:
                if message["type"] == "http.response.start":
                    raw = [(k.decode(), v.decode()) for k, v in message.get("headers", [])]
                    yield message["status"], [*raw, (REPLICA_HEADER, self.name)]
                elif message["type"] == "http.response.body" and message.get("body"):
                    yield message["body"]
        finally:
            done.set()
            await task


def unavailable() -> JSONResponse:
    """The answer to a request whose replica died under it: safe to send again (adapter ids are task hashes)."""
    return JSONResponse({"error": {"code": "replica_unavailable", "message": "the replica handling this request "
                                   "stopped; send the request again", "field": None}}, status_code=503,
                        headers={"Retry-After": "1"})


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Router:
    """HTTP ingress: each request to a replica, keyed by the adapter it names."""

    def __init__(self, replica: Any) -> None:
        self.replica = replica

    async def __call__(self, request: Request) -> Response:
        body = await request.body()
        adapter_id = adapter_of(request.url.path, body)
        handle = self.replica.options(stream=True, multiplexed_model_id=adapter_id, method_name="call")
        chunks = handle.remote(request.method, request.url.path, request.url.query, list(request.headers.items()), body)
        try:
            status, headers = await chunks.__anext__()
        except Exception as exc:  # noqa: BLE001 (a replica died or is restarting)
            log.warning("replica call failed: %s", exc)
            return unavailable()
        kept = {k: v for k, v in headers if k.lower() not in ("content-length", "transfer-encoding")}
        if kept.get("content-type", "").startswith("text/event-stream"):  # ASGI header names are lower-case
            async def rest() -> AsyncIterator[bytes]:
                async for chunk in chunks:
                    yield chunk

            return StreamingResponse(rest(), status_code=status, headers=kept)
        # A whole answer is read before it is sent: a replica dying half-way gives a clean 503, not a cut body.
        try:
            content = b"".join([chunk async for chunk in chunks])
        except Exception as exc:  # noqa: BLE001 (the replica died while answering)
            log.warning("replica stopped mid-answer: %s", exc)
            return unavailable()
        return Response(content, status_code=status, headers=kept)


def build(env: dict[str, str] | None = None, replicas: int = 1, autoscaling: dict[str, Any] | None = None,
          cpus_per_replica: float = 1) -> Any:
    """The Ray Serve application: ``replicas`` hypergen replicas (or ``autoscaling``, Ray's
    ``autoscaling_config``) behind one router. ``env``: HYPERGEN_* settings for every replica
    (default: this process's). A replica's engine subprocesses stop with it."""
    env = {k: v for k, v in (os.environ if env is None else env).items() if k.startswith(("HYPERGEN_", "VLLM_", "HF_"))}
    sizing: dict[str, Any] = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": replicas}
    replica = Replica.options(**sizing, ray_actor_options={"num_cpus": cpus_per_replica}).bind(env)
    return Router.bind(replica)


def run(host: str, port: int, replicas: int, env: dict[str, str] | None = None) -> None:
    """Starts (or joins, with RAY_ADDRESS) Ray, deploys hypergen on it and blocks."""
    import ray

    ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build(env, replicas), name="hypergen", route_prefix="/", blocking=True)
