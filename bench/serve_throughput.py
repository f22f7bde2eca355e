"""Generation throughput with many adapters in one engine versus the base model and ICL.

    .venv/bin/python bench/serve_throughput.py [--url http://host:port] [--requests 64] [--max-tokens 32]

All requests of a scenario are in flight at once, so the engine batches them.
Scenarios: the base model alone; the same 64 requests spread over 1, 4, 16 and 64
distinct generated adapters (created and loaded beforehand); and in-context
learning: the base model with the task's 3 demos in the prompt instead of an
adapter. Then task inputs with one adapter, two ways: 64 separate `input`
requests at once, and one request with `inputs` of 64. Throughput is completion
tokens / wall time; answers_per_s counts answered prompts (the fair
measure for the two input scenarios, whose answers are a few tokens long). Without --url it starts
`hypergen serve` (vLLM, max_loras=64) twice, one after the other: with hypergen's CPU LoRA ops
(the default) and with vLLM's own (HYPERGEN_CPU_LORA_OPS=0), and reports both side by side.
Every scenario runs 3 times, the rounds interleaved (base, 1, 4, ... adapters, then again), and
the median round is reported with all three. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from tasks import synthetic_task  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from launcher import ServerProcess  # noqa: E402  (the test suite's server harness)

ADAPTER_COUNTS = (1, 4, 16, 64)
ROUNDS = 3  # every scenario this many times, interleaved; the median round is reported
OPS = {"hypergen_ops": "1", "vllm_ops": "0"}  # HYPERGEN_CPU_LORA_OPS per server


def icl_prompt(task, word: str) -> str:
    shots = "\n".join(f"Input: {d.input}\nOutput: {d.output}" for d in task.demos)
    return f"{task.instruction}\n\n{shots}\nInput: {word}\nOutput:"


async def scenario(client: httpx.AsyncClient, bodies: list[dict]) -> dict:
    start = time.perf_counter()
    responses = await asyncio.gather(*(client.post("/generate", json=b) for b in bodies))
    wall = time.perf_counter() - start
    for r in responses:
        r.raise_for_status()
    tokens = sum(r.json()["usage"]["completion_tokens"] for r in responses)
    answers = sum(len(b.get("inputs", [None])) for b in bodies)
    return {"tokens": tokens, "seconds": round(wall, 2), "tokens_per_s": round(tokens / wall, 1), "answers_per_s": round(answers / wall, 2)}


async def run(url: str, n: int, max_tokens: int, rounds: int = ROUNDS) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        offset = int(time.time())
        tasks = [synthetic_task(offset + i) for i in range(max(ADAPTER_COUNTS))]
        ids = []
        for task, word in tasks:
            r = await client.post("/adapters", json={**task.to_dict(), "options": {"warm": True}})
            ids.append(r.json()["adapter_id"])
            await client.post("/generate", json={"prompt": word, "adapter_id": ids[-1], "max_tokens": 1})
        sampling = {"max_tokens": max_tokens, "temperature": 0.0}

        def bodies(k: int | None, icl: bool = False) -> list[dict]:
            out = []
            for i in range(n):
                task, word = tasks[i % len(tasks)]
                prompt = icl_prompt(task, word) if icl else f"{task.instruction}\nInput: {word}\nOutput:"
                body = {"prompt": prompt, **sampling}
                if k is not None:
                    body["adapter_id"] = ids[i % k]
                out.append(body)
            return out

        words = [tasks[i % len(tasks)][1] for i in range(n)]
        scenarios = {"base": bodies(None), **{f"adapters_{k}": bodies(k) for k in ADAPTER_COUNTS},
                     "icl_3_demos": bodies(None, icl=True),
                     "inputs_separate_requests": [{"input": w, "adapter_id": ids[0], **sampling} for w in words],
                     "inputs_one_request": [{"inputs": words, "adapter_id": ids[0], **sampling}]}
        await scenario(client, bodies(None)[:8])  # warm-up
        runs: dict[str, list[dict]] = {name: [] for name in scenarios}
        for _ in range(rounds):  # interleaved, so a slow moment of the machine hits every scenario alike
            for name, batch in scenarios.items():
                runs[name].append(await scenario(client, batch))
        results = {name: sorted(found, key=lambda r: r["tokens_per_s"])[len(found) // 2] for name, found in runs.items()}
        base = results["base"]["tokens_per_s"]
        for name, result in results.items():
            result["vs_base"] = round(result["tokens_per_s"] / base, 2)
            result["rounds_tokens_per_s"] = [r["tokens_per_s"] for r in runs[name]]
        return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    if args.url is not None:
        results = asyncio.run(run(args.url, args.requests, args.max_tokens))
        print(json.dumps({"requests": args.requests, "max_tokens": args.max_tokens, **results}))
        return
    report = {"requests": args.requests, "max_tokens": args.max_tokens}
    for name, flag in OPS.items():
        env = {"HYPERGEN_ENGINE": "vllm", "HYPERGEN_REDIS_URL": "", "HYPERGEN_MAX_LORAS": str(max(ADAPTER_COUNTS)),
               "HYPERGEN_CPU_LORA_OPS": flag}
        server = ServerProcess(Path(tempfile.mkdtemp()), env, "bench").wait_ready()
        try:
            report[name] = asyncio.run(run(server.url, args.requests, args.max_tokens))
        finally:
            server.stop()
    ours, theirs = report["hypergen_ops"], report["vllm_ops"]
    report["hypergen_vs_vllm_ops"] = {k: round(ours[k]["tokens_per_s"] / theirs[k]["tokens_per_s"], 2) for k in ours}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
