"""Server latency: POST /adapters miss and hit, and time to first token (TTFT).

    .venv/bin/python bench/serve_latency.py [--url http://host:port] [--n 20]

Without --url it starts `hypergen serve` (vLLM engine, Redis from HYPERGEN_REDIS_URL,
default redis://127.0.0.1:6379/0, under a fresh key prefix). Server-side times come
from the Server-Timing header; client-side times include HTTP on loopback; the miss's generation part (encoder, network,
serialisation, on the server's hypernetwork thread) is the mean from its /metrics, with its stages
(encode, hypernetwork, tensors, serialise). ``--ab generator-process`` instead compares misses with the
generator process (the default) and without it, ``--ab generator-dtype`` int8 heads against float32 generation,
``--ab miss-batching`` misses batched (the default) against one at a time, ``--ab adapter-dtype`` adapters
stored in bf16 (the default for vLLM in bf16) against float32: two servers side by side, ``--rounds``
rounds of 10 new tasks each, sent one after another, or ``--burst N`` at once (then also the time until the
last of them is answered). Every task is new, in its words too
(`tasks.synthetic_task`), so a miss encodes all its texts. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from tasks import synthetic_task  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from launcher import ServerProcess  # noqa: E402  (the test suite's server harness)


GENERATION, STAGES = "hypergen_hypernetwork_seconds", "hypergen_generation_stage_seconds"


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * (len(values) - 1) + 0.5))], 2)


def server_ms(response: httpx.Response) -> float:
    return float(response.headers["server-timing"].split("dur=")[1])


def ttft(client: httpx.Client, body: dict) -> float:
    start = time.perf_counter()
    with client.stream("POST", "/generate", json={**body, "stream": True, "max_tokens": 4}) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:]).get("text"):
                return (time.perf_counter() - start) * 1000  # closing the stream aborts the rest
    raise RuntimeError("no token came back")


def histogram(client: httpx.Client, name: str) -> dict[str, tuple[float, float]]:
    """(sum, count) per label value ("" without labels) of one of the server's histograms."""
    found: dict[str, list[float]] = {}
    for line in client.get("/metrics").text.splitlines():
        for part, index in (("_sum", 0), ("_count", 1)):
            if line.startswith(name + part):
                series, value = line.rsplit(" ", 1)
                label = series.split('"')[1] if '"' in series else ""
                found.setdefault(label, [0.0, 0.0])[index] = float(value)
    return {label: (total, count) for label, (total, count) in found.items()}


def mean_ms(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Mean milliseconds per label between two readings of a histogram."""
    means = {}
    for label, (total, count) in after.items():
        total_before, count_before = before.get(label, (0.0, 0.0))
        means[label] = round(1000 * (total - total_before) / max(1.0, count - count_before), 2)
    return means


def create(client: httpx.Client, task, cached: bool, client_ms: list[float], server_ms_: list[float]) -> dict:  # noqa: ANN001
    """POST /adapters once, recording client- and server-side milliseconds; checks the cache tier."""
    start = time.perf_counter()
    r = client.post("/adapters", json=task.to_dict())
    client_ms.append((time.perf_counter() - start) * 1000)
    server_ms_.append(server_ms(r))
    assert r.json()["cached"] is cached
    return r.json()


def start_server(**env: str) -> ServerProcess:
    """`hypergen serve` on vLLM with Redis under a fresh key prefix (HYPERGEN_* overrides in ``env``)."""
    env = {"HYPERGEN_ENGINE": "vllm", "HYPERGEN_REDIS_URL": os.environ.get("HYPERGEN_REDIS_URL", "redis://127.0.0.1:6379/0"),
           "HYPERGEN_REDIS_PREFIX": f"bench-{uuid.uuid4().hex[:8]}:", **env}
    return ServerProcess(Path(tempfile.mkdtemp()), env, "bench").wait_ready()


AB = {  # comparison -> {variant: the server's HYPERGEN_* settings}; the first variant is the default's
    "generator-process": {"process": {"HYPERGEN_GENERATOR_PROCESS": "true"}, "server": {"HYPERGEN_GENERATOR_PROCESS": "false"}},
    "generator-dtype": {"int8": {"HYPERGEN_GENERATOR_DTYPE": "int8"}, "float32": {"HYPERGEN_GENERATOR_DTYPE": "float32"}},
    "miss-batching": {"batched": {"HYPERGEN_GENERATION_MAX_BATCH": "16"}, "single": {"HYPERGEN_GENERATION_MAX_BATCH": "1"}},
    "adapter-dtype": {"bfloat16": {"HYPERGEN_ADAPTER_DTYPE": "bfloat16"}, "float32": {"HYPERGEN_ADAPTER_DTYPE": "float32"}},
}


def side_by_side(comparison: str, rounds: int, burst: int = 0) -> None:
    """Misses on two servers up at once that differ in one setting (``AB``), rounds alternated
    between them: 10 new tasks one after another, or ``burst`` new tasks sent at once (then also
    the time until the last answer). One JSON line with p50, p95 and stage medians of each."""
    servers = {name: start_server(**env) for name, env in AB[comparison].items()}
    offset = int(time.time())
    try:
        clients = {name: httpx.Client(base_url=s.url, timeout=300) for name, s in servers.items()}
        times: dict[str, list[float]] = {name: [] for name in servers}
        walls: dict[str, list[float]] = {name: [] for name in servers}
        stages: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
        for r in range(rounds):
            for v, (name, client) in enumerate(clients.items()):
                before = histogram(client, STAGES)
                tasks = [synthetic_task(offset + 1000 * r + i + 500_000 * v)[0] for i in range(burst or 10)]
                start = time.perf_counter()
                if burst:
                    with ThreadPoolExecutor(burst) as pool:
                        list(pool.map(lambda task: create(client, task, False, [], times[name]), tasks))  # noqa: B023
                else:
                    for task in tasks:
                        create(client, task, False, [], times[name])
                walls[name].append((time.perf_counter() - start) * 1000)
                stages[name].append(mean_ms(before, histogram(client, STAGES)))
        p50 = {name: pct(values, .5) for name, values in times.items()}
        first, second = p50.values()
        out = {
            "comparison": comparison, "burst": burst, "miss_server_ms_p50": p50,
            "miss_server_ms_p95": {name: pct(values, .95) for name, values in times.items()},
            "first_over_second": round(first / second, 3),
            "stage_median_ms": {name: {k: round(statistics.median(d[k] for d in rows), 2) for k in rows[0]} for name, rows in stages.items()},
            "rounds": rounds,
        }
        if burst:
            wall = {name: round(statistics.median(values), 1) for name, values in walls.items()}
            first, second = wall.values()
            out.update(burst_wall_ms_median=wall, burst_wall_first_over_second=round(first / second, 3))
        print(json.dumps(out))
    finally:
        for server in servers.values():
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url")
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--ab", choices=sorted(AB), help="only compare misses on two servers that differ in one setting")
    parser.add_argument("--rounds", type=int, default=10, help="with --ab: rounds of 10 new tasks per server")
    parser.add_argument("--burst", type=int, default=0, help="with --ab: each round sends this many new tasks at once")
    parser.add_argument("--after-generate", action="store_true", help="send a 2-token generation before each miss")
    args = parser.parse_args()
    if args.ab:
        return side_by_side(args.ab, args.rounds, args.burst)
    server = None
    if args.url is None:
        server = start_server()
        args.url = server.url
    offset = int(time.time())  # fresh tasks on every run, so misses are real misses
    try:
        with httpx.Client(base_url=args.url, timeout=300) as client:
            tasks = [synthetic_task(offset + i) for i in range(args.n)]
            miss_srv, miss_cli, hit_srv, hit_cli, ids = [], [], [], [], []
            generation, stages = histogram(client, GENERATION), histogram(client, STAGES)
            for task, _ in tasks:
                if args.after_generate:  # a server that is also generating: the engine has just run a step
                    client.post("/generate", json={"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 2})
                ids.append(create(client, task, False, miss_cli, miss_srv)["adapter_id"])
            generation_ms = mean_ms(generation, histogram(client, GENERATION)).get("", 0.0)
            stage_ms = mean_ms(stages, histogram(client, STAGES))
            for _ in range(3):
                for task, _ in tasks:
                    create(client, task, True, hit_cli, hit_srv)

            prompt = lambda word: {"messages": [{"role": "user", "content": word}]}  # noqa: E731
            new = [ttft(client, {**prompt(w), "task": t.to_dict()}) for t, w in (synthetic_task(offset + 10_000 + i) for i in range(args.n // 2))]
            resident_ids = ids[: args.n // 2]
            for adapter_id in resident_ids:  # load once
                ttft(client, {**prompt("x"), "adapter_id": adapter_id})
            resident = [ttft(client, {**prompt(w), "adapter_id": a}) for a, (_, w) in zip(resident_ids, tasks)]
            base = [ttft(client, prompt(w)) for _, w in tasks[: args.n // 2]]
            ready = client.get("/readyz").json()
        print(json.dumps({
            "adapter_miss_server_ms": {"p50": pct(miss_srv, .5), "p95": pct(miss_srv, .95)},
            "adapter_miss_client_ms": {"p50": pct(miss_cli, .5), "p95": pct(miss_cli, .95)},
            "adapter_miss_generation_mean_ms": generation_ms,  # of the miss: encode + network + bytes
            "adapter_miss_stage_mean_ms": stage_ms,
            "adapter_hit_server_ms": {"p50": pct(hit_srv, .5), "p95": pct(hit_srv, .95)},
            "adapter_hit_client_ms": {"p50": pct(hit_cli, .5), "p95": pct(hit_cli, .95)},
            "ttft_ms": {"new_adapter_p50": pct(new, .5), "resident_adapter_p50": pct(resident, .5), "base_p50": pct(base, .5)},
            "n": args.n, "after_generate": args.after_generate, "engine": ready.get("engine"), "redis": ready.get("redis"),
        }))
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
