"""Dependency failures degrade instead of crashing: Redis outages, a saturated engine, auth.

These use the transformers engine (HYPERGEN_ENGINE=hf) for their extra replicas: each
needs its own server process, and a second vLLM engine would only cost start-up time.
"""
from __future__ import annotations

import json
import threading
import time

import pytest
import redis as redis_lib

from launcher import ServerProcess

from test_server import new_task


def test_redis_down_mid_test_degrades_then_recovers(server_env, own_redis, tmp_path):
    env = {**server_env, "HYPERGEN_ENGINE": "hf", "HYPERGEN_REDIS_URL": own_redis.url}
    server = ServerProcess(tmp_path, env, "redis-outage").wait_ready()
    try:
        with server.client() as client:
            assert client.get("/readyz").json()["status"] == "ready"
            kept = client.post("/adapters", json=new_task("before")).json()
            raw = redis_lib.Redis.from_url(own_redis.url)
            assert raw.exists(f"{server_env['HYPERGEN_REDIS_PREFIX']}adapter:{kept['adapter_id']}")

            own_redis.stop()
            task = new_task("during")
            during = client.post("/adapters", json=task)
            assert during.status_code == 200 and during.json()["cached"] is False
            again = client.post("/adapters", json=task).json()  # served from memory
            assert again["cached"] is True and again["cache_tier"] == "memory"
            gen = client.post("/generate", json={"prompt": "Hi", "adapter_id": kept["adapter_id"], "max_tokens": 3})
            assert gen.status_code == 200
            ready = client.get("/readyz")
            assert ready.status_code == 200 and ready.json()["status"] == "degraded"

            own_redis.start()  # same port: the server reconnects by itself
            deadline = time.monotonic() + 30
            while client.get("/readyz").json()["status"] != "ready" and time.monotonic() < deadline:
                time.sleep(0.5)
            assert client.get("/readyz").json()["status"] == "ready"
            after = client.post("/adapters", json=new_task("after")).json()
            raw = redis_lib.Redis.from_url(own_redis.url)
            assert raw.exists(f"{server_env['HYPERGEN_REDIS_PREFIX']}adapter:{after['adapter_id']}")
    finally:
        server.stop()


def test_server_without_redis_uses_its_own_cache(server_env, tmp_path):
    env = {k: v for k, v in server_env.items() if k != "HYPERGEN_REDIS_URL"}
    server = ServerProcess(tmp_path, {**env, "HYPERGEN_ENGINE": "hf", "HYPERGEN_REDIS_URL": "",
                                      "HYPERGEN_API_KEYS": '["sekrit"]', "HYPERGEN_MAX_CONCURRENT_REQUESTS": "1"}, "solo").wait_ready()
    try:
        with server.client() as anon, server.client(headers={"Authorization": "Bearer sekrit"}) as client:
            assert client.get("/readyz").json()["redis"] == "not configured"
            # API keys: required on the API, not on health checks.
            denied = anon.post("/adapters", json=new_task())
            assert denied.status_code == 401 and denied.json()["error"]["code"] == "unauthorized"
            assert anon.post("/adapters", json=new_task(), headers={"Authorization": "Bearer wrong"}).status_code == 401
            task = new_task()
            assert client.post("/adapters", json=task).json()["cached"] is False
            assert client.post("/adapters", json=task).json()["cache_tier"] == "memory"

            # Saturation: with one slot taken by a long stream, the next request is refused with 503.
            started = threading.Event()
            events: list[dict] = []

            def long_stream():
                with client.stream("POST", "/generate", json={"prompt": "Count: 1, 2,", "max_tokens": 120, "stream": True}) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            started.set()
                            events.append(json.loads(line[6:]))

            worker = threading.Thread(target=long_stream)
            worker.start()
            assert started.wait(60)
            busy = client.post("/generate", json={"prompt": "Hi", "max_tokens": 2})
            worker.join(120)
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["code"] == "engine_busy"
            assert events[-1]["done"] is True
            assert client.post("/generate", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200
    finally:
        server.stop()


@pytest.mark.parametrize("bad", ["abc", "A" * 64, "g" * 64, "a" * 64 + "\n", "../" + "a" * 61])
def test_adapter_ids_are_never_paths(bad):
    from server.adapters import is_adapter_id

    assert not is_adapter_id(bad)
    assert is_adapter_id("0123456789abcdef" * 4)


@pytest.mark.vllm
def test_a_dead_engine_costs_503s_until_a_new_one_is_up(server_env, tmp_path):
    """vLLM's engine core is a child process; killed (as a crash would), the server answers 503
    engine_busy while it starts a new engine, then serves again, adapters included."""
    import os
    import signal
    import subprocess

    pytest.importorskip("vllm")
    env = {**server_env, "HYPERGEN_ENGINE": "vllm", "HYPERGEN_DTYPE": "float32"}
    server = ServerProcess(tmp_path, env, "revive").wait_ready()
    try:
        with server.client() as client:
            adapter_id = client.post("/adapters", json=new_task("revive")).json()["adapter_id"]
            body = {"input": "big", "adapter_id": adapter_id, "max_tokens": 2}
            assert client.post("/generate", json=body).status_code == 200
            children = subprocess.run(["pgrep", "-P", str(server.proc.pid)], capture_output=True, text=True).stdout.split()
            assert children, "vLLM's engine core runs in a child process"
            for pid in children:
                os.kill(int(pid), signal.SIGKILL)
            codes = []
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and codes[-1:] != [200]:
                answer = client.post("/generate", json=body)
                codes.append(answer.status_code)
                if answer.status_code != 200:
                    assert answer.status_code == 503 and answer.json()["error"]["code"] == "engine_busy", answer.text
                    time.sleep(1)
            assert codes[-1] == 200 and 503 in codes, codes
            assert server.proc.poll() is None and client.get("/readyz").status_code == 200
    finally:
        server.stop()


def test_a_dead_generator_process_costs_speed_not_answers(server_env, tmp_path):
    """The server generates misses in a child process; killed, the next misses are generated in
    the server itself (same adapters), and a new child takes over a few seconds later."""
    import os
    import signal
    import subprocess

    server = ServerProcess(tmp_path, {**server_env, "HYPERGEN_ENGINE": "hf"}, "genproc").wait_ready()
    try:
        with server.client() as client:
            assert client.get("/readyz").json()["generating_in"] == "process"
            child = subprocess.run(["pgrep", "-P", str(server.proc.pid), "-f", "server.generator_process"],
                                   capture_output=True, text=True).stdout.split()
            assert len(child) == 1, child
            before = client.post("/adapters", json=new_task("before")).json()["adapter_id"]
            os.kill(int(child[0]), signal.SIGKILL)
            after = client.post("/adapters", json=new_task("after"))
            assert after.status_code == 200, after.text
            assert client.get("/readyz").json()["generating_in"] == "server"
            assert "hypergen_generator_fallbacks_total 1.0" in client.get("/metrics").text
            assert client.post("/generate", json={"input": "big", "adapter_id": after.json()["adapter_id"], "max_tokens": 2}).status_code == 200
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and client.get("/readyz").json()["generating_in"] != "process":
                assert client.post("/adapters", json=new_task("meanwhile")).status_code == 200
                time.sleep(1)
            assert client.get("/readyz").json()["generating_in"] == "process"
            assert client.get(f"/adapters/{before}").status_code == 200
    finally:
        server.stop()
