"""The server over real HTTP: vLLM CPU engine, real Redis on 127.0.0.1:6379, real hypernetwork."""
from __future__ import annotations

import io
import json
import re
import tarfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = pytest.mark.vllm


def new_task(label: str = "") -> dict:
    """A task no earlier request has used (fresh hash), so the first POST is a real miss."""
    tag = uuid.uuid4().hex[:8]
    return {
        "instruction": f"Answer with the antonym of the given word. {label} {tag}",
        "demos": [{"input": "hot", "output": "cold"}, {"input": "up", "output": "down"}],
    }


def metric(client: httpx.Client, name: str, labels: str = "") -> float:
    text = client.get("/metrics").text
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


@pytest.fixture(scope="module")
def client(vllm_server):
    with vllm_server.client() as c:
        yield c


CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["engine"] == "vllm" and ready["redis"] is True


def test_adapter_miss_then_hit(client):
    task = new_task()
    runs = metric(client, "hypergen_hypernetwork_runs_total")
    first = client.post("/adapters", json=task)
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["cached"] is False and body["cache_tier"] is None
    assert re.fullmatch(r"[0-9a-f]{64}", body["adapter_id"])
    assert body["rank"] == 8 and body["target_modules"] == ["q_proj", "v_proj"] and body["size_bytes"] > 1_000_000
    assert body["links"]["weights"] == f"/adapters/{body['adapter_id']}/weights"
    second = client.post("/adapters", json=task).json()
    assert second["adapter_id"] == body["adapter_id"]
    assert second["cached"] is True and second["cache_tier"] == "memory"
    assert metric(client, "hypergen_hypernetwork_runs_total") == runs + 1


def test_adapter_metadata_weights_and_delete(client, smollm_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_id = client.post("/adapters", json=new_task()).json()["adapter_id"]
    meta = client.get(f"/adapters/{adapter_id}")
    assert meta.status_code == 200 and meta.json()["adapter_id"] == adapter_id
    weights = client.get(f"/adapters/{adapter_id}/weights")
    assert weights.status_code == 200 and weights.headers["content-type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(weights.content)) as tar:
        tar.extractall(tmp_path, filter="data")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm_dir), tmp_path / adapter_id)
    assert sum("lora_B" in k for k in model.state_dict()) == 60
    assert client.delete(f"/adapters/{adapter_id}").status_code == 204
    assert client.get(f"/adapters/{adapter_id}").status_code == 404
    assert client.delete(f"/adapters/{adapter_id}").status_code == 404


def test_generate_with_adapter_id_and_inline_task(client):
    task = new_task()
    adapter_id = client.post("/adapters", json=task).json()["adapter_id"]
    by_id = client.post("/generate", json={"messages": CHAT, "adapter_id": adapter_id, "max_tokens": 12})
    inline = client.post("/generate", json={"messages": CHAT, "task": task, "max_tokens": 12})
    base = client.post("/generate", json={"messages": CHAT, "max_tokens": 12})
    assert by_id.status_code == inline.status_code == base.status_code == 200, by_id.text
    a, b, c = by_id.json(), inline.json(), base.json()
    assert a["adapter_id"] == b["adapter_id"] == adapter_id and c["adapter_id"] is None
    assert a["text"] == b["text"]  # greedy, same adapter
    assert "Paris" in c["text"]
    assert a["text"] != c["text"]  # the (randomised) adapter changes the answer
    assert a["usage"]["prompt_tokens"] == c["usage"]["prompt_tokens"] > 10
    assert 0 < a["usage"]["completion_tokens"] <= 12
    assert set(a["timings"]) == {"adapter_ms", "queue_ms", "generate_ms"}


def test_input_is_answered_in_the_prompt_the_adapter_was_trained_on(client):
    task = new_task("input")
    created = client.post("/adapters", json=task).json()
    adapter_id, template = created["adapter_id"], created["prompt_template"]
    assert created["instruction"] == task["instruction"]
    assert template.count("{input}") == 1 and task["instruction"] in template
    assert client.get(f"/adapters/{adapter_id}").json()["prompt_template"] == template

    by_input = client.post("/generate", json={"input": "big", "adapter_id": adapter_id, "max_tokens": 12}).json()
    by_hand = client.post("/generate", json={
        "messages": [{"role": "user", "content": f"{task['instruction']}\n\nInput: big\nOutput:"}],
        "adapter_id": adapter_id, "max_tokens": 12,
    }).json()
    assert by_input["text"] == by_hand["text"] and by_input["usage"] == by_hand["usage"]
    # The template, filled in and sent raw through the OpenAI route, is the same prompt.
    raw = client.post("/v1/completions", json={
        "model": adapter_id, "prompt": template.replace("{input}", "big"), "max_tokens": 12, "temperature": 0,
    }).json()
    assert raw["choices"][0]["text"] == by_input["text"]
    assert raw["usage"]["prompt_tokens"] == by_input["usage"]["prompt_tokens"]

    # use_adapter: false is the same prompt on the base model, and creates nothing.
    runs = metric(client, "hypergen_hypernetwork_runs_total")
    base = client.post("/generate", json={"input": "big", "adapter_id": adapter_id, "use_adapter": False, "max_tokens": 12}).json()
    inline_base = client.post("/generate", json={"input": "big", "task": new_task("never"), "use_adapter": False, "max_tokens": 2})
    assert base["adapter_id"] is None and inline_base.json()["adapter_id"] is None
    assert base["usage"]["prompt_tokens"] == by_input["usage"]["prompt_tokens"]
    assert base["text"] != by_input["text"]  # the (randomised) adapter changes the answer
    assert metric(client, "hypergen_hypernetwork_runs_total") == runs


def test_inputs_answer_in_order_and_a_failing_input_keeps_the_rest(client):
    task = new_task("batch")
    inputs = [" ".join(["word"] * (i + 1)) for i in range(64)]
    response = client.post("/generate", json={"inputs": inputs, "task": task, "max_tokens": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    results = body["results"]
    assert len(results) == 64 and body["adapter_id"] is not None
    assert all(r["error"] is None and r["text"] is not None and r["finish_reason"] for r in results)
    tokens = [r["usage"]["prompt_tokens"] for r in results]
    assert tokens == sorted(tokens) and len(set(tokens)) == 64  # each input's own prompt, in input order
    assert body["usage"]["prompt_tokens"] == sum(tokens)
    assert body["usage"]["completion_tokens"] == sum(r["usage"]["completion_tokens"] for r in results)

    mixed = client.post("/generate", json={"inputs": ["big", "word " * 2000, "small"], "task": task, "max_tokens": 3})
    assert mixed.status_code == 200, mixed.text
    first, too_long, last = mixed.json()["results"]
    assert too_long["text"] is None and too_long["error"]["code"] == "prompt_too_long"
    assert too_long["error"]["field"] == "inputs.1"
    assert first["text"] is not None and last["text"] is not None and first["error"] is None


def test_streaming_matches_non_streaming(client):
    task = new_task()
    request = {"prompt": "The three primary colours are", "task": task, "max_tokens": 10}
    whole = client.post("/generate", json=request).json()
    events = []
    with client.stream("POST", "/generate", json={**request, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert events[-1]["done"] is True and events[-1]["usage"] == whole["usage"]
    assert "".join(e["text"] for e in events) == whole["text"]
    assert len(events) > 2


def test_openai_client_on_both_routes(vllm_server, client):
    from openai import OpenAI

    adapter_id = client.post("/adapters", json=new_task()).json()["adapter_id"]
    oai = OpenAI(base_url=f"{vllm_server.url}/v1", api_key="unused")
    models = [m.id for m in oai.models.list()]
    assert "smollm2-135m-instruct" in models and adapter_id in models

    completion = oai.completions.create(model=adapter_id, prompt="One, two, three,", max_tokens=8, temperature=0)
    assert completion.choices[0].text and completion.usage.completion_tokens <= 8
    chat = oai.chat.completions.create(model="smollm2-135m-instruct", messages=CHAT, max_tokens=12, temperature=0)
    assert "Paris" in chat.choices[0].message.content

    streamed = oai.chat.completions.create(model=adapter_id, messages=CHAT, max_tokens=12, temperature=0, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    whole = oai.chat.completions.create(model=adapter_id, messages=CHAT, max_tokens=12, temperature=0)
    assert text == whole.choices[0].message.content
    stream_c = oai.completions.create(model=adapter_id, prompt="One, two, three,", max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream_c) == completion.choices[0].text

    from openai import NotFoundError

    with pytest.raises(NotFoundError):
        oai.completions.create(model="f" * 64, prompt="x", max_tokens=2)


def test_concurrent_identical_requests_run_the_hypernetwork_once(vllm_server, client):
    task = new_task("concurrent")
    runs = metric(client, "hypergen_hypernetwork_runs_total")

    def post(_):
        with vllm_server.client() as c:
            return c.post("/adapters", json=task)

    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(post, range(20)))
    assert all(r.status_code == 200 for r in responses)
    assert len({r.json()["adapter_id"] for r in responses}) == 1
    assert metric(client, "hypergen_hypernetwork_runs_total") == runs + 1


def test_concurrent_distinct_misses_are_generated_in_batches_each_with_its_own_adapter(vllm_server, client):
    tasks = [new_task(f"burst {i}") for i in range(12)]
    batched = metric(client, "hypergen_generation_batch_size_sum")

    def post(task):
        with vllm_server.client() as c:
            return c.post("/adapters", json=task)

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(post, tasks))
    assert all(r.status_code == 200 and r.json()["cached"] is False for r in responses)
    assert len({r.json()["adapter_id"] for r in responses}) == 12
    assert metric(client, "hypergen_generation_batch_size_sum") == batched + 12  # every miss went through a batch
    with vllm_server.client() as c:  # each adapter is its own task's: asking again is a hit with the same id
        again = [c.post("/adapters", json=task).json() for task in tasks[:3]]
    assert [a["adapter_id"] for a in again] == [r.json()["adapter_id"] for r in responses[:3]]
    assert all(a["cached"] for a in again)


def test_two_replicas_share_adapters_through_redis(client, hf_replica):
    task = new_task("shared")
    created = client.post("/adapters", json=task).json()
    with hf_replica.client() as other:
        runs = metric(other, "hypergen_hypernetwork_runs_total")
        seen = other.post("/adapters", json=task).json()
        assert seen["adapter_id"] == created["adapter_id"]
        assert seen["cached"] is True and seen["cache_tier"] == "redis"
        assert metric(other, "hypergen_hypernetwork_runs_total") == runs
        # and the other way round
        made_there = other.post("/adapters", json=new_task("other-way")).json()
        assert other.get(f"/adapters/{made_there['adapter_id']}").status_code == 200
        fleet = {m["id"]: m for m in client.get("/v1/models").json()["data"]}  # the fleet's, from Redis
        assert fleet[made_there["adapter_id"]]["held_here"] is False and fleet[created["adapter_id"]]["held_here"] is True
        # The record carries the instruction, so the other replica builds the same prompt.
        assert other.get(f"/adapters/{created['adapter_id']}").json()["prompt_template"] == created["prompt_template"]
        answer = other.post("/generate", json={"input": "big", "adapter_id": created["adapter_id"], "max_tokens": 2})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] > 0
    assert client.get(f"/adapters/{made_there['adapter_id']}").json()["cache_tier"] in ("redis", "memory")


def test_a_delete_on_one_replica_holds_on_every_replica(client, hf_replica):
    adapter_id = client.post("/adapters", json=new_task("fleet delete")).json()["adapter_id"]
    with hf_replica.client() as other:
        answer = other.post("/generate", json={"input": "big", "adapter_id": adapter_id, "max_tokens": 2})
        assert answer.status_code == 200  # the other replica now holds it: memory, folder, engine
        assert other.get(f"/adapters/{adapter_id}").json()["cache_tier"] == "memory"
        assert client.delete(f"/adapters/{adapter_id}").status_code == 204
        deadline = time.monotonic() + 10
        while other.get(f"/adapters/{adapter_id}").status_code != 404 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert other.get(f"/adapters/{adapter_id}").status_code == 404
        gone = other.post("/generate", json={"input": "big", "adapter_id": adapter_id, "max_tokens": 2})
        assert gone.status_code == 404 and adapter_id not in [m["id"] for m in other.get("/v1/models").json()["data"]]


def test_corrupt_redis_entry_is_dropped_and_regenerated(client, hf_replica, redis_client, redis_prefix):
    task = new_task("corrupt")
    adapter_id = client.post("/adapters", json=task).json()["adapter_id"]
    key = f"{redis_prefix}blob:{adapter_id}"
    blob = bytearray(redis_client.get(key))
    blob[-50] ^= 0xFF
    redis_client.set(key, bytes(blob), keepttl=True)
    with hf_replica.client() as other:  # its memory tier has never seen this task
        runs = metric(other, "hypergen_hypernetwork_runs_total")
        again = other.post("/adapters", json=task).json()
        assert again["adapter_id"] == adapter_id and again["cached"] is False
        assert metric(other, "hypergen_hypernetwork_runs_total") == runs + 1
        assert metric(other, "hypergen_cache_corrupt_total", '{tier="redis"}') >= 1
    from hypergen.adapter import verify_blob

    verify_blob(redis_client.get(key))  # the regenerated entry replaced the damaged one


def test_an_entry_without_the_instruction_reads_as_a_miss(client, hf_replica, redis_client, redis_prefix):
    """Entries written before records kept the instruction cannot build prompts: regenerated, not served."""
    task = new_task("outdated")
    adapter_id = client.post("/adapters", json=task).json()["adapter_id"]
    key = f"{redis_prefix}adapter:{adapter_id}"
    meta = json.loads(redis_client.get(key))
    del meta["instruction"]
    redis_client.set(key, json.dumps(meta), keepttl=True)
    with hf_replica.client() as other:  # its memory tier has never seen this task
        assert other.get(f"/adapters/{adapter_id}").status_code == 404
        again = other.post("/adapters", json=task).json()
        assert again["cached"] is False and again["instruction"] == task["instruction"]
    assert json.loads(redis_client.get(key))["instruction"] == task["instruction"]


def test_streaming_clients_that_leave_early_give_their_slots_back(vllm_server, client):
    """Clients that time out while their adapter is created never read a byte of the stream;
    their admission slots must still come back, whether or not the server runs the body."""

    def leave_early(_):
        try:
            httpx.post(f"{vllm_server.url}/generate", json={"prompt": "Hello", "task": new_task("gone"), "stream": True,
                                                            "max_tokens": 64}, timeout=0.02)
        except httpx.TimeoutException:
            return True
        return False

    runs = metric(client, "hypergen_hypernetwork_runs_total")
    with ThreadPoolExecutor(16) as pool:
        left = sum(pool.map(leave_early, range(16)))
    assert left > 0
    for _ in range(900):  # the server notices the disconnects on its own schedule (90 s: a slow, shared host)
        # this burst's adapters were made (so its requests got past creation) and no slot is held
        if metric(client, "hypergen_requests_in_engine") == 0 and metric(client, "hypergen_hypernetwork_runs_total") > runs:
            break
        time.sleep(0.1)
    assert metric(client, "hypergen_requests_in_engine") == 0
    assert client.post("/generate", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_a_replica_that_releases_its_lock_without_a_result_is_not_waited_for(client, redis_client, redis_prefix, generator):
    """Another replica holds the creation lock, then drops it without writing (its Redis write
    failed): this one computes the adapter itself instead of waiting out the 30 s lock."""
    from hypergen.task import Task, task_hash

    task = new_task("lock")
    # the server's own fingerprint: its checkpoint holds the test network's weights in bf16
    adapter_id = task_hash(Task.from_dict(task), client.get("/readyz").json()["hypernetwork"], generator.spec.to_dict())
    lock = f"{redis_prefix}lock:{adapter_id}"
    redis_client.set(lock, "another-replica", px=30_000)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(lambda: client.post("/adapters", json=task, timeout=15))
        time.sleep(0.5)
        assert not pending.done()  # it is waiting for the other replica
        redis_client.delete(lock)
        created = pending.result()  # well before the lock's 30 s TTL (the client gives up at 15 s)
    assert created.status_code == 200 and created.json()["cached"] is False
    assert created.json()["adapter_id"] == adapter_id


def test_composition_with_weights_one_and_zero_answers_as_the_first_adapter(client):
    first = client.post("/adapters", json=new_task("first")).json()
    second = client.post("/adapters", json=new_task("second")).json()["adapter_id"]
    parts = [{"adapter_id": first["adapter_id"], "weight": 1}, {"adapter_id": second, "weight": 0}]
    made = client.post("/adapters/compose", json={"parts": parts})
    assert made.status_code == 200, made.text
    composed = made.json()
    assert composed["cached"] is False and composed["composition"] == {"method": "linear", "parts": parts}
    assert (composed["rank"], composed["alpha"], composed["instruction"]) == (8, first["alpha"], first["instruction"])
    again = client.post("/adapters/compose", json={"parts": parts}).json()
    assert again["adapter_id"] == composed["adapter_id"] and again["cached"] is True

    def answer(**target) -> dict:
        response = client.post("/generate", json={"messages": CHAT, "max_tokens": 12, **target})
        assert response.status_code == 200, response.text
        return response.json()

    assert answer(adapter_id=composed["adapter_id"])["text"] == answer(adapter_id=first["adapter_id"])["text"]
    inline = answer(adapters=parts)
    assert inline["adapter_id"] == composed["adapter_id"]  # the inline form is the same cached composition
    not_an_id = client.get("/adapters/compose")  # its own resource, not an adapter id
    assert not_an_id.status_code == 405 and not_an_id.headers["allow"] == "POST"
    too_wide = client.post("/adapters/compose", json={"parts": parts, "method": "cat"})
    assert too_wide.status_code == 422 and too_wide.json()["error"]["field"] == "method"  # rank 16 > the engine's 8


def test_a_composition_of_two_task_adapters_changes_answers_on_both_tasks(client):
    antonyms = new_task("antonyms")
    plural = {"instruction": f"Write the plural of the given noun. {uuid.uuid4().hex[:8]}",
              "demos": [{"input": "cat", "output": "cats"}, {"input": "box", "output": "boxes"}]}
    parts = [{"adapter_id": client.post("/adapters", json=t).json()["adapter_id"], "weight": 0.5} for t in (antonyms, plural)]
    for task, inputs in ((antonyms, ["big", "early", "open"]), (plural, ["dog", "church", "city"])):
        composed = client.post("/adapters/compose", json={"parts": parts, "method": "svd", "instruction": task["instruction"]}).json()
        assert composed["instruction"] == task["instruction"] and composed["rank"] == 8
        with_it, without = (client.post("/generate", json={"inputs": inputs, "adapter_id": composed["adapter_id"],
                                                           "use_adapter": use, "max_tokens": 8}).json() for use in (True, False))
        assert [r["text"] for r in with_it["results"]] != [r["text"] for r in without["results"]]


def test_a_demo_pool_answers_each_input_with_the_adapter_of_its_nearest_demos(client):
    tag = uuid.uuid4().hex[:8]
    pool = [{"input": "hot", "output": "cold"}, {"input": "up", "output": "down"},
            {"input": "cat", "output": "cats"}, {"input": "box", "output": "boxes"}]
    body = {"task": {"instruction": f"Transform the word as the examples do. {tag}", "demo_pool": pool, "select": {"k": 2}},
            "inputs": ["puppy", "kitten", "warm"], "max_tokens": 6}
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    out = response.json()
    ids = [r["adapter_id"] for r in out["results"]]
    assert ids[0] == ids[1] and len(set(ids)) == 2 and out["adapter_id"] is None
    by_id = client.post("/generate", json={"inputs": ["puppy"], "adapter_id": ids[0], "max_tokens": 6}).json()
    assert by_id["results"][0]["text"] == out["results"][0]["text"]  # an ordinary, cached adapter
    plural = client.get(f"/adapters/{ids[0]}").json()
    assert plural["num_demos"] == 2 and plural["cached"] is True
    first = client.post("/generate", json={**body, "task": {**body["task"], "select": {"k": 2, "by": "first"}}}).json()
    assert len({r["adapter_id"] for r in first["results"]}) == 1 and first["adapter_id"] == first["results"][0]["adapter_id"]


BAD_REQUESTS = [
    ("/adapters", {"instruction": "  ", "demos": []}, 422, "instruction"),
    ("/adapters", {"instruction": "x", "demos": [{"input": "a"}]}, 422, "demos.0.output"),
    ("/adapters", {"instruction": "x", "demos": [{"input": "a", "output": ""}]}, 422, "demos.0.output"),
    ("/adapters", {"instruction": "x" * 8001}, 422, "instruction"),
    ("/adapters", {"instruction": "x", "demos": [{"input": "a", "output": "b"}] * 33}, 422, "demos"),
    ("/adapters", {"instruction": "x", "colour": "red"}, 422, "colour"),
    ("/adapters", {"instruction": 5}, 422, "instruction"),
    ("/generate", {"prompt": "hi", "adapter_id": "../../etc/passwd"}, 422, "adapter_id"),
    ("/generate", {"prompt": "hi", "adapter_id": "0" * 64}, 404, "adapter_id"),
    ("/generate", {"prompt": "hi", "messages": CHAT}, 422, "messages"),
    ("/generate", {"max_tokens": 3}, 422, "input"),
    ("/generate", {"prompt": "hi", "input": "big"}, 422, "input"),
    ("/generate", {"messages": CHAT, "inputs": ["big"]}, 422, "inputs"),
    ("/generate", {"inputs": []}, 422, "inputs"),
    ("/generate", {"inputs": ["x"] * 257}, 422, "inputs"),
    ("/generate", {"inputs": ["big", 5]}, 422, "inputs.1"),
    ("/generate", {"inputs": ["big"], "stream": True}, 422, "stream"),
    ("/generate", {"input": "big", "use_adapter": 0}, 422, "use_adapter"),
    ("/generate", {"input": "big", "adapter_id": "A" * 64}, 422, "adapter_id"),
    ("/generate", {"input": "word " * 2000}, 413, "input"),
    ("/generate", {"input": "big", "max_tokens": "3"}, 422, "max_tokens"),
    ("/generate", {"prompt": ""}, 422, "prompt"),
    ("/adapters", {"instruction": "x", "options": {"warm": 0}}, 422, "options.warm"),
    ("/generate", {"prompt": "hi", "max_tokens": 100000}, 422, "max_tokens"),
    ("/generate", {"prompt": "hi", "max_tokens": 0}, 422, "max_tokens"),
    ("/generate", {"prompt": "hi", "temperature": 9}, 422, "temperature"),
    ("/generate", {"prompt": "word " * 2000}, 413, "prompt"),
    ("/generate", {"prompt": "hi", "task": {"instruction": "x", "demos": [{"input": "a"}]}}, 422, "task.demos.0.output"),
    ("/generate", {"prompt": "hi", "adapter_id": "0" * 64, "task": {"instruction": "x"}}, 422, "task"),
    ("/generate", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 422, "stop"),
    ("/generate", {"prompt": "hi", "adapters": [{"adapter_id": "0" * 64}]}, 404, "adapters.0.adapter_id"),
    ("/generate", {"prompt": "hi", "adapter_id": "0" * 64, "adapters": [{"adapter_id": "0" * 64}]}, 422, "adapters"),
    ("/generate", {"prompt": "hi", "adapters": []}, 422, "adapters"),
    ("/generate", {"prompt": "hi", "task": {"instruction": "x", "demo_pool": [{"input": "a", "output": "b"}]}}, 422, "task.demo_pool"),
    ("/generate", {"input": "a", "task": {"instruction": "x", "select": {"k": 1}}}, 422, "task.select"),
    ("/generate", {"input": "a", "task": {"instruction": "x", "demo_pool": [{"input": "a", "output": "b"}], "select": {"k": 2}}}, 422, "task.select.k"),
    ("/generate", {"input": "a", "task": {"instruction": "x", "demo_pool": [{"input": "a", "output": "b"}], "select": {"by": "closest"}}}, 422, "task.select.by"),
    ("/generate", {"input": "a", "task": {"instruction": "x", "demo_pool": [{"input": "a", "output": "b"}] * 1001}}, 422, "task.demo_pool"),
    ("/generate", {"input": "a", "task": {"instruction": "x", "demo_pool": [{"input": "a", "output": " "}]}}, 422, "task.demo_pool.0.output"),
    ("/adapters", {"instruction": "x", "demo_pool": [{"input": "a", "output": "b"}]}, 422, "demo_pool"),
    ("/adapters/compose", {"parts": []}, 422, "parts"),
    ("/adapters/compose", {"parts": [{"adapter_id": "0" * 64, "weight": -1}]}, 422, "parts.0.weight"),
    ("/adapters/compose", {"parts": [{"adapter_id": "0" * 64}]}, 404, "parts.0.adapter_id"),
    ("/adapters/compose", {"parts": [{"adapter_id": "0" * 64}], "method": "mean"}, 422, "method"),
    ("/adapters/compose", {"parts": [{"adapter_id": "0" * 64}] * 9}, 422, "parts"),
]


@pytest.mark.parametrize("path, body, status, field", BAD_REQUESTS)
def test_bad_input_gets_a_4xx_naming_the_field(client, path, body, status, field):
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["field"] == field and error["message"] and error["code"]


def test_malformed_and_oversized_bodies_and_unknown_ids(client):
    bad_json = client.post("/adapters", content=b"{not json", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"
    huge = client.post("/adapters", content=b'{"instruction": "' + b"x" * 2_000_000 + b'"}', headers={"content-type": "application/json"})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "body_too_large"

    def chunked():  # no content-length: the bound is found while reading
        yield b'{"instruction": "'
        for _ in range(40):
            yield b"x" * 50_000
        yield b'"}'

    streamed = client.post("/adapters", content=chunked(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "body_too_large"
    assert client.get("/adapters/not-a-hash").status_code == 422
    assert client.get("/adapters/" + "a" * 64 + "/weights").status_code == 404
    assert client.get("/nope").json()["error"]["code"] == "not_found"
    assert client.get("/healthz").status_code == 200  # still serving


def test_metrics_expose_routes_cache_tiers_and_residency(client):
    client.post("/generate", json={"prompt": "Hello", "task": new_task(), "max_tokens": 2})
    text = client.get("/metrics").text
    assert 'hypergen_requests_total{method="POST",route="/generate",status="200"}' in text
    assert 'hypergen_request_seconds_bucket{le="0.005",route="/adapters"}' in text
    assert 'hypergen_cache_misses_total{tier="memory"}' in text and 'hypergen_cache_hits_total{tier="memory"}' in text
    assert 'hypergen_cache_misses_total{tier="redis"}' in text
    assert metric(client, "hypergen_engine_adapters_resident") >= 1
    assert metric(client, "hypergen_hypernetwork_runs_total") >= 1


def test_concurrent_requests_on_two_replicas_run_the_hypernetwork_once(vllm_server, hf_replica, client):
    task = new_task("two-replicas")
    with hf_replica.client() as other:
        before = metric(client, "hypergen_hypernetwork_runs_total") + metric(other, "hypergen_hypernetwork_runs_total")

        def post(i):
            server = vllm_server if i % 2 else hf_replica
            with server.client() as c:
                return c.post("/adapters", json=task)

        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(post, range(16)))
        after = metric(client, "hypergen_hypernetwork_runs_total") + metric(other, "hypergen_hypernetwork_runs_total")
    assert all(r.status_code == 200 for r in responses)
    assert len({r.json()["adapter_id"] for r in responses}) == 1
    assert after == before + 1
