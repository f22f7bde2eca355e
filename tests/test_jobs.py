"""Refine jobs over real HTTP: the session's vLLM server, a worker process per job, real Redis."""
from __future__ import annotations

import io
import tarfile
import time

import httpx
import pytest
from test_server import new_task

pytestmark = pytest.mark.vllm

# Antonyms, which the randomised test hypernetwork's adapter does not know.
EXAMPLES = [{"input": i, "output": o} for i, o in [
    ("hot", "cold"), ("up", "down"), ("big", "small"), ("fast", "slow"), ("open", "closed"), ("light", "dark"),
    ("tall", "short"), ("early", "late"),
]]


@pytest.fixture(scope="module")
def client(vllm_server):
    with vllm_server.client() as c:
        yield c


def parent(client: httpx.Client) -> str:
    return client.post("/adapters", json=new_task("refine")).json()["adapter_id"]


def wait(client: httpx.Client, job_id: str, until: tuple[str, ...] = ("done", "failed", "cancelled"), timeout: float = 900) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in until:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s")


def test_a_refine_job_runs_to_done_and_its_adapter_serves(client, tmp_path, hf_replica, smollm_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    parent_id = parent(client)
    body = {"examples": EXAMPLES[:6], "steps": 8, "lr": 5e-3, "holdout": EXAMPLES[6:]}
    started = client.post(f"/adapters/{parent_id}/refine", json=body)
    assert started.status_code == 202, started.text
    job = started.json()
    assert job["status"] in ("queued", "running") and job["steps_total"] == 8 and job["links"]["self"] == f"/jobs/{job['job_id']}"
    with hf_replica.client() as other:  # job state is in Redis: another replica answers too
        assert other.get(f"/jobs/{job['job_id']}").json()["adapter_id"] == job["adapter_id"]
    done = wait(client, job["job_id"])
    assert done["status"] == "done", done
    assert done["steps_done"] == 8 and done["loss"] > 0
    assert done["adapter"]["adapter_id"] == job["adapter_id"] and done["adapter"]["parent_id"] == parent_id
    assert set(done["holdout"]) == {"before", "after"}
    assert done["holdout"]["after"]["rougeL"] >= 0 and done["holdout"]["before"]["exact_match"] >= 0
    refined = job["adapter_id"]
    # an ordinary adapter: metadata, /generate, the OpenAI routes, the weights
    assert client.get(f"/adapters/{refined}").json()["instruction"] == client.get(f"/adapters/{parent_id}").json()["instruction"]
    answers = client.post("/generate", json={"adapter_id": refined, "inputs": ["hot", "up"], "max_tokens": 4}).json()
    before = client.post("/generate", json={"adapter_id": parent_id, "inputs": ["hot", "up"], "max_tokens": 4}).json()
    assert answers["adapter_id"] == refined and [r["text"] for r in answers["results"]] != [r["text"] for r in before["results"]]
    assert client.post("/v1/completions", json={"model": refined, "prompt": "hot", "max_tokens": 2}).status_code == 200
    with tarfile.open(fileobj=io.BytesIO(client.get(f"/adapters/{refined}/weights").content)) as tar:
        tar.extractall(tmp_path, filter="data")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm_dir), tmp_path / refined)
    assert sum("lora_B" in k for k in model.state_dict()) == 60
    again = client.post(f"/adapters/{parent_id}/refine", json=body).json()  # same request: same adapter, from cache
    assert again["status"] == "done" and again["adapter_id"] == refined and again["adapter"]["cached"] is True


def test_cancel_a_queue_that_is_full_and_jobs_that_fail(client):
    parent_id = parent(client)
    long = {"examples": EXAMPLES, "steps": 5000}
    running = client.post(f"/adapters/{parent_id}/refine", json=long).json()
    queued = client.post(f"/adapters/{parent_id}/refine", json={**long, "steps": 4999}).json()
    full = client.post(f"/adapters/{parent_id}/refine", json={**long, "steps": 4998})
    assert full.status_code == 503 and "Retry-After" in full.headers  # 1 running + 1 queued is the test server's bound
    assert queued["status"] == "queued"
    for job in (queued, running):
        cancelled = client.delete(f"/jobs/{job['job_id']}")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        assert client.get(f"/jobs/{job['job_id']}").status_code == 404  # cancelled is deleted
        assert client.delete(f"/jobs/{job['job_id']}").status_code == 404
    # a job whose worker fails says why: no example fits the prompt limit of training (1024 tokens)
    huge = [{"input": "7 " * 1999, "output": "x"}] * 2  # about 2,000 tokens each, under the 4,000-character field limit
    failed = wait(client, client.post(f"/adapters/{parent_id}/refine", json={"examples": huge, "steps": 2}).json()["job_id"])
    assert failed["status"] == "failed" and failed["error"]["field"] == "examples" and "1024" in failed["error"]["message"]
    finished = client.delete(f"/jobs/{failed['job_id']}")  # a finished job cannot be cancelled
    assert finished.status_code == 409 and finished.json()["error"]["field"] == "job_id"
    assert client.get("/readyz").status_code == 200  # the server keeps serving


@pytest.mark.parametrize("body, field", [
    ({"examples": EXAMPLES[:1]}, "examples"),
    ({"examples": [{"input": "a", "output": " "}, *EXAMPLES[:2]]}, "examples.0.output"),
    ({"examples": EXAMPLES, "steps": 0}, "steps"),
    ({"examples": EXAMPLES, "lr": 0.5}, "lr"),
    ({"examples": EXAMPLES, "holdout": [{"input": "a"}]}, "holdout.0.output"),
])
def test_bad_refine_requests_name_the_field(client, body, field):
    response = client.post(f"/adapters/{parent(client)}/refine", json=body)
    assert response.status_code == 422 and response.json()["error"]["field"] == field, response.text


def test_unknown_parents_and_jobs_are_404(client):
    missing = client.post(f"/adapters/{'0' * 64}/refine", json={"examples": EXAMPLES})
    assert missing.status_code == 404 and missing.json()["error"]["field"] == "adapter_id"
    assert client.get(f"/jobs/{'0' * 32}").status_code == 404
    assert client.delete(f"/jobs/{'0' * 32}").status_code == 404
    assert client.get("/jobs/not-a-job").status_code == 422
