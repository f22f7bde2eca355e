"""Tenants over real HTTP: two API keys (one configured as its hash), real Redis, the transformers engine.

Each key owns what it makes; the other key must find it unknown on every route, in both
directions, with the very answer an id that never existed gets.
"""
from __future__ import annotations

import hashlib
import time
import uuid

import pytest

from launcher import ServerProcess

KEY_A, KEY_B, KEY_C = "alpha-key-" + "1" * 20, "bravo-key-" + "2" * 20, "charlie-key-" + "3" * 20
ADAPTER_QUOTA, RATE = 8, 400
EXAMPLES = [{"input": "big", "output": "small"}, {"input": "fast", "output": "slow"}]


def task(tag: str = "") -> dict:
    return {"instruction": f"Answer with the antonym of the given word. {tag}",
            "demos": [{"input": "hot", "output": "cold"}, {"input": "up", "output": "down"}]}


@pytest.fixture(scope="module")
def server(server_env, tmp_path_factory):
    hashed_b = "sha256:" + hashlib.sha256(KEY_B.encode()).hexdigest()  # B's plain key is not in the environment
    env = {**server_env, "HYPERGEN_ENGINE": "hf", "HYPERGEN_API_KEYS": f'["{KEY_A}", "{hashed_b}", "{KEY_C}"]',
           "HYPERGEN_REDIS_PREFIX": f"{server_env['HYPERGEN_REDIS_PREFIX']}tenants-{uuid.uuid4().hex[:6]}:",
           "HYPERGEN_TENANT_MAX_ADAPTERS": str(ADAPTER_QUOTA), "HYPERGEN_TENANT_REQUESTS_PER_MINUTE": str(RATE)}
    server = ServerProcess(tmp_path_factory.mktemp("tenants"), env, "tenants").wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def clients(server):
    made = {name: server.client(headers={"Authorization": f"Bearer {key}"}) for name, key in (("a", KEY_A), ("b", KEY_B), ("c", KEY_C))}
    yield made
    for client in made.values():
        client.close()


def test_a_key_given_as_its_hash_works_and_a_wrong_key_does_not(server, clients):
    assert clients["b"].get("/v1/models").status_code == 200
    with server.client(headers={"Authorization": "Bearer " + hashlib.sha256(KEY_B.encode()).hexdigest()}) as wrong:
        assert wrong.get("/v1/models").status_code == 401  # the hash itself is not a key


def test_the_same_task_gives_each_tenant_its_own_adapter(clients):
    shared = task(uuid.uuid4().hex[:8])
    a, b = (clients[name].post("/adapters", json=shared).json() for name in ("a", "b"))
    assert a["adapter_id"] != b["adapter_id"]
    assert a["cached"] is False and b["cached"] is False  # B learns nothing of A's request
    assert "owner" not in a and a["public"] is False


def _unknown_answers(client, adapter_id: str) -> dict[str, tuple[int, str, str | None]]:
    """Every route's answer (status, code, field) for an adapter id, as a caller sees it."""
    answers = {}

    def record(name, response):
        error = response.json()["error"] if response.status_code >= 400 else {}
        answers[name] = (response.status_code, error.get("code"), error.get("field"))

    record("get", client.get(f"/adapters/{adapter_id}"))
    record("weights", client.get(f"/adapters/{adapter_id}/weights"))
    record("generate", client.post("/generate", json={"input": "big", "adapter_id": adapter_id, "max_tokens": 2}))
    record("generate_inline", client.post("/generate", json={"input": "big", "adapters": [{"adapter_id": adapter_id}], "max_tokens": 2}))
    record("compose", client.post("/adapters/compose", json={"parts": [{"adapter_id": adapter_id}]}))
    record("refine", client.post(f"/adapters/{adapter_id}/refine", json={"examples": EXAMPLES, "steps": 1}))
    record("completions", client.post("/v1/completions", json={"model": adapter_id, "prompt": "hi", "max_tokens": 2}))
    record("delete", client.delete(f"/adapters/{adapter_id}"))
    return answers


@pytest.mark.parametrize("owner, other", [("a", "b"), ("b", "a")])
def test_another_tenants_adapter_is_unknown_on_every_route(clients, owner, other):
    mine = clients[owner].post("/adapters", json=task(uuid.uuid4().hex[:8])).json()["adapter_id"]
    never = uuid.uuid4().hex * 2  # an id nobody made
    seen = _unknown_answers(clients[other], mine)
    assert seen == _unknown_answers(clients[other], never)  # indistinguishable from an id that never existed
    assert seen["get"] == (404, "adapter_not_found", "adapter_id")
    assert seen["generate_inline"] == (404, "adapter_not_found", "adapters.0.adapter_id")
    assert seen["compose"] == (404, "adapter_not_found", "parts.0.adapter_id")
    assert seen["completions"] == (404, "adapter_not_found", "model")
    listed = [m["id"] for m in clients[other].get("/v1/models").json()["data"]]
    assert mine not in listed
    # ...and all of it still works for its owner (the other's failed DELETE removed nothing)
    assert mine in [m["id"] for m in clients[owner].get("/v1/models").json()["data"]]
    assert clients[owner].get(f"/adapters/{mine}").status_code == 200
    assert clients[owner].post("/generate", json={"input": "big", "adapter_id": mine, "max_tokens": 2}).status_code == 200
    composed = clients[owner].post("/adapters/compose", json={"parts": [{"adapter_id": mine, "weight": 0.5}]}).json()["adapter_id"]
    assert clients[other].get(f"/adapters/{composed}").status_code == 404
    job = clients[owner].post(f"/adapters/{mine}/refine", json={"examples": EXAMPLES, "steps": 1})
    assert job.status_code == 202, job.text
    job_id = job.json()["job_id"]
    for response in (clients[other].get(f"/jobs/{job_id}"), clients[other].delete(f"/jobs/{job_id}")):
        assert response.status_code == 404 and response.json()["error"]["code"] == "job_not_found"
    assert clients[owner].get(f"/jobs/{job_id}").status_code == 200
    assert clients[owner].delete(f"/adapters/{mine}").status_code == 204


def test_a_public_adapter_is_readable_by_all_and_deletable_only_by_its_owner(clients):
    public = clients["a"].post("/adapters", json={**task(uuid.uuid4().hex[:8]), "options": {"public": True}}).json()
    assert public["public"] is True
    adapter_id = public["adapter_id"]
    assert clients["b"].get(f"/adapters/{adapter_id}").json()["public"] is True
    answer = clients["b"].post("/generate", json={"input": "big", "adapter_id": adapter_id, "max_tokens": 2})
    assert answer.status_code == 200 and answer.json()["adapter_id"] == adapter_id
    refused = clients["b"].delete(f"/adapters/{adapter_id}")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "not_owner"
    assert clients["a"].delete(f"/adapters/{adapter_id}").status_code == 204
    assert clients["b"].get(f"/adapters/{adapter_id}").status_code == 404


def test_quotas_answer_429_with_retry_after(clients):
    made = []
    for i in range(ADAPTER_QUOTA):
        response = clients["c"].post("/adapters", json=task(f"quota {i} {uuid.uuid4().hex[:6]}"))
        assert response.status_code == 200, response.text
        made.append(response.json()["adapter_id"])
    over = clients["c"].post("/adapters", json=task(f"one too many {uuid.uuid4().hex[:6]}"))
    assert over.status_code == 429 and over.json()["error"]["code"] == "adapter_quota" and int(over.headers["Retry-After"]) > 0
    assert clients["c"].delete(f"/adapters/{made[0]}").status_code == 204
    assert clients["c"].post("/adapters", json=task(f"after a delete {uuid.uuid4().hex[:6]}")).status_code == 200
    assert clients["a"].post("/adapters", json=task(f"A is not C {uuid.uuid4().hex[:6]}")).status_code == 200

    statuses = []
    deadline = time.monotonic() + 50
    while time.monotonic() < deadline and 429 not in statuses:
        statuses.append(clients["c"].get("/v1/models").status_code)
    assert statuses[-1] == 429 and set(statuses[:-1]) == {200}
    limited = clients["c"].get("/v1/models")
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(limited.headers["Retry-After"]) <= 61
    assert clients["a"].get("/v1/models").status_code == 200  # one key's limit is its own
