"""hypergen on Ray Serve (`hypergen serve --ray`): a local Ray, two replicas (transformers engine), Redis shared.

Over HTTP, as users call it: requests for one adapter stay on one replica, a replica that never
generated an adapter serves it from Redis, a delete holds on every replica, and a killed replica
costs at most a clear 503 while Ray replaces it.
"""
import os
import signal
import subprocess
import time
import httpx
import pytest

from launcher import ServerProcess
from test_server import new_task

pytest.importorskip("ray.serve")

REPLICA = "x-hypergen-replica"


@pytest.fixture(scope="module")
def fleet(server_env, tmp_path_factory):
    env = {**server_env, "HYPERGEN_ENGINE": "hf", "RAY_DISABLE_DOCKER_CPU_WARNING": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_ADDRESS": "local"}
    server = ServerProcess(tmp_path_factory.mktemp("ray"), env, "ray", args=("--ray", "--replicas", "2")).wait_ready(timeout=400)
    with server.client() as client:
        deadline = time.monotonic() + 120  # both replicas up: answers from two names
        seen: set[str] = set()
        while len(seen) < 2 and time.monotonic() < deadline:
            seen.add(client.get("/v1/models").headers[REPLICA])
    yield server
    server.stop()
    subprocess.run(["pkill", "-f", "ServeReplica:hypergen"], check=False)


def test_one_adapter_stays_on_one_replica_and_others_take_it_from_redis(fleet):
    with fleet.client() as client:
        made_on, served_on = {}, {}
        for i in range(10):
            made = client.post("/adapters", json=new_task(f"ray {i}"))
            assert made.status_code == 201 or made.status_code == 200, made.text
            adapter_id = made.json()["adapter_id"]
            made_on[adapter_id] = made.headers[REPLICA]
            replicas = set()
            for _ in range(3):
                answer = client.post("/generate", json={"input": "big", "adapter_id": adapter_id, "max_tokens": 2})
                assert answer.status_code == 200, answer.text
                replicas.add(answer.headers[REPLICA])
            assert len(replicas) == 1  # Ray's multiplexing: the replica that holds it
            served_on[adapter_id] = replicas.pop()
        assert len(set(made_on.values())) == 2 and len(set(served_on.values())) == 2
        # an adapter generated on one replica and served by the other came from Redis (no task was sent there)
        assert any(made_on[a] != served_on[a] for a in made_on)


def test_a_delete_holds_on_every_replica(fleet):
    with fleet.client() as client:
        adapter_id = client.post("/adapters", json=new_task("ray delete")).json()["adapter_id"]
        assert client.post("/generate", json={"input": "big", "adapter_id": adapter_id, "max_tokens": 2}).status_code == 200
        assert client.delete(f"/adapters/{adapter_id}").status_code == 204
        time.sleep(1)
        answered_by = set()
        for _ in range(16):  # /v1/models names no adapter: any replica answers, from Redis and its own memory
            models = client.get("/v1/models")
            answered_by.add(models.headers[REPLICA])
            assert adapter_id not in [m["id"] for m in models.json()["data"]]
        assert len(answered_by) == 2
        assert client.get(f"/adapters/{adapter_id}").status_code == 404
        assert client.post("/generate", json={"input": "big", "adapter_id": adapter_id, "max_tokens": 2}).status_code == 404


def test_a_killed_replica_costs_at_most_a_clear_503(fleet):
    pids = subprocess.run(["pgrep", "-f", "ServeReplica:hypergen:Replica"], capture_output=True, text=True).stdout.split()
    assert pids, "no replica process found"
    os.kill(int(pids[0]), signal.SIGKILL)
    codes = []
    with fleet.client() as client:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                answer = client.post("/generate", json={"input": "big", "max_tokens": 2, "task": new_task("after kill")})
            except httpx.HTTPError as exc:
                codes.append(f"transport: {type(exc).__name__}")
                continue
            codes.append(answer.status_code)
            if answer.status_code == 503:
                assert answer.json()["error"]["code"] in ("replica_unavailable", "engine_busy", "not_ready")
            if codes[-3:] == [200, 200, 200]:
                break
    assert set(codes) <= {200, 503}, codes
    assert codes[-3:] == [200, 200, 200], codes


class FakeReplicaHandle:
    """Ray's streaming handle, faked: answers (status, headers), then ``chunks``, then dies if ``dies``."""

    def __init__(self, content_type: str, chunks: list[bytes], dies: bool) -> None:
        self.content_type, self.chunks, self.dies = content_type, chunks, dies

    def options(self, **_: object) -> "FakeReplicaHandle":
        return self

    def remote(self, *_: object):
        async def answer():
            yield 200, [("content-type", self.content_type), ("content-length", "99")]
            for chunk in self.chunks:
                yield chunk
            if self.dies:
                raise RuntimeError("ActorDiedError (fake)")
        return answer()


def route_with_fake_replica(content_type: str, dies: bool) -> tuple[int, bytes]:
    """One POST through the real Router class, its replica a fake; what the client would receive."""
    import asyncio
    from starlette.requests import Request
    from server.ray_serve import Router

    router = Router.func_or_class(FakeReplicaHandle(content_type, [b'{"text": ', b'"hal'], dies))
    scope = {"type": "http", "method": "POST", "path": "/generate", "query_string": b"", "headers": []}

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def client_stays():  # the client never disconnects while the answer is sent
        await asyncio.Event().wait()

    async def run() -> tuple[int, bytes]:
        response = await router(Request(scope, receive))
        sent = []

        async def send(message):
            sent.append(message)
        try:
            await response(scope, client_stays, send)
        except RuntimeError:
            pass  # a streamed answer is cut where the replica died
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])
    return asyncio.run(run())


def test_fake_replica_dying_mid_answer_gives_a_clear_503_not_a_cut_body():
    status, body = route_with_fake_replica("application/json", dies=True)
    assert status == 503 and b"replica_unavailable" in body
    status, body = route_with_fake_replica("application/json", dies=False)
    assert (status, body) == (200, b'{"text": "hal')  # the whole answer, whatever the replica's chunking
    status, body = route_with_fake_replica("text/event-stream", dies=True)
    assert status == 200 and body == b'{"text": "hal'  # a stream is passed on as it comes (its status already sent)


def test_fake_app_replica_starts_once_when_its_first_caller_gives_up():
    """A readiness probe that times out cancels its call; the start must go on, not begin twice,
    and the started app must stay up (not be shut down when the start's frame is collected)."""
    import asyncio
    import gc
    from contextlib import asynccontextmanager
    from server.ray_serve import Replica

    events: list[str] = []

    class FakeApp:
        class state:
            hypergen = None

        class router:
            @staticmethod
            @asynccontextmanager
            async def lifespan_context(app):
                events.append("enter")
                await asyncio.sleep(0.2)  # a model load, slow enough to be given up on
                app.state.hypergen = "ready"
                try:
                    yield
                finally:
                    events.append("exit")

    replica = object.__new__(Replica.func_or_class)
    replica.app, replica._life, replica._starting = FakeApp, None, None

    async def scenario() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(replica._start(), 0.05)  # the probe gives up
        await replica._start()  # the next call waits for the same start
        gc.collect()
        await asyncio.sleep(0)
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(scenario())
        assert events == ["enter"] and FakeApp.state.hypergen == "ready"
    finally:
        loop.close()
