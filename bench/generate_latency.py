"""Latency of task -> adapter bytes (encode + hypernetwork + serialisation), default spec.

    .venv/bin/python bench/generate_latency.py [--checkpoint DIR[,DIR]] [--tasks 50] [--dtype float32,int8]
                                               [--adapter-dtype float32,bfloat16]

Prints one JSON line. "cold" is the first task after loading; p50/p95 are over
the following distinct tasks (3 demos each), one at a time, with the median of each
stage (encoder, hypernetwork, tensors, serialisation); batch16 is generate_many on 16
new tasks and their blobs (``to_blobs``, as the server makes them), per task (the median of 3 batches). With several
checkpoints, dtypes or adapter dtypes (what the blob's tensors are stored in: by default what the
server would store, ``HYPERGEN_ADAPTER_DTYPE``), one generator per combination is loaded into this process and
every task goes to each in turn (the order alternating), so their figures are side by side on
the same tasks ("variants"); "p50_over_first" compares them.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time

import torch

from hypergen.adapter import tensor_distance, to_blobs
from hypergen.engines import adapter_dtype
from hypergen.generator import HyperGenerator
from hypergen.settings import get_settings

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from tasks import synthetic_task  # noqa: E402


def make_task(i: int):
    return synthetic_task(i)[0]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def against_float32(gen: HyperGenerator, tasks: list) -> dict[str, float]:
    """How far this generator's adapters and embeddings are from float32 ones for the same tasks:
    the largest |adapter - float32 adapter| relative to the float32 adapter's per-task correction
    (adapter minus the shared LoRA), and the lowest cosine between the two encoders' embeddings.
    Adapters stored in bf16 count their storage rounding too (which a bf16 engine applies anyway)."""
    exact = HyperGenerator.from_pretrained(gen.checkpoint, device=gen.device, dtype="float32")
    shared = exact.shared_adapter().tensors
    worst, lowest = 0.0, 1.0
    for task in tasks:
        a, b = exact.generate(task), gen.generate(task)
        diff, correction = tensor_distance(a.tensors, b.tensors), tensor_distance(a.tensors, shared)
        worst = max(worst, diff / max(correction, 1e-12))
    texts = [exact.encoder.single(t.instruction) for t in tasks] + [exact.encoder.pair(d.input, d.output) for t in tasks for d in t.demos]
    lowest = float((exact.encoder.embed_ids(texts) * gen.encoder.embed_ids(texts)).sum(-1).min())
    return {"max_adapter_diff_over_correction": worst, "min_embedding_cosine": round(lowest, 6)}


def measure(gens: dict[str, HyperGenerator], n_tasks: int) -> dict[str, dict]:
    """Latency figures per generator, the generators taking turns on the same tasks."""
    order = list(gens)
    cold = {}
    for name in order:
        start = time.perf_counter()
        gens[name].generate(make_task(-1)).to_bytes()
        cold[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in order}
    stages = {name: {"encode_ms": [], "hypernetwork_ms": [], "tensors_ms": [], "bytes_ms": []} for name in order}
    for i in range(n_tasks):
        task = make_task(i)
        for name in (order if i % 2 == 0 else order[::-1]):
            gen = gens[name]
            start = time.perf_counter()
            adapter = gen.generate(task)
            made = time.perf_counter()
            adapter.to_bytes()
            times[name].append(time.perf_counter() - start)
            for stage, value in {**gen.last_timings, "bytes_ms": (time.perf_counter() - made) * 1000}.items():
                stages[name][stage].append(value)
    batch16: dict[str, list[float]] = {name: [] for name in order}
    for r in range(3):
        batch = [make_task(1000 + 16 * r + i) for i in range(16)]
        for name in (order if r % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            to_blobs(gens[name].generate_many(batch))  # as the server's generator process does
            batch16[name].append((time.perf_counter() - start) / 16)
    out = {}
    for name in order:
        ts = sorted(times[name])
        gen = gens[name]
        out[name] = {
            "p50_ms": ms(statistics.median(ts)),
            "p95_ms": ms(ts[int(0.95 * (len(ts) - 1))]),
            "batch16_ms_per_task": ms(statistics.median(batch16[name])),
            "p50_stages_ms": {stage: round(statistics.median(v), 2) for stage, v in stages[name].items()},
            "cold_ms": ms(cold[name]),
            "dtype": gen.compute_dtype,
            "encoder_dtype": gen.encoder_dtype,
            "adapter_dtype": gen.adapter_dtype,
            "vs_float32": against_float32(gen, [make_task(i) for i in range(20)])
            if {gen.compute_dtype, gen.encoder_dtype} != {"float32"} else None,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", default=get_settings().checkpoint)
    parser.add_argument("--device", default=get_settings().device, help="the hypernetwork's device (HYPERGEN_DEVICE)")
    parser.add_argument("--dtype", default=get_settings().generator_dtype,
                        help="what the encoder and hypernetwork compute in (HYPERGEN_GENERATOR_DTYPE); several, comma-separated, side by side")
    parser.add_argument("--adapter-dtype", default=adapter_dtype(get_settings()),
                        help="what the adapters are stored in (HYPERGEN_ADAPTER_DTYPE, resolved as the server does); several, comma-separated")
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    axes = [args.checkpoint.split(","), args.dtype.split(","), args.adapter_dtype.split(",")]
    gens = {}
    for c, d, a in itertools.product(*axes):  # named by what varies: "bfloat16", "/tmp/old", or "/tmp/old@int8"
        name = "@".join(value for value, axis in zip((c, d, a), axes) if len(axis) > 1) or d
        gens[name] = HyperGenerator.from_pretrained(c, device=args.device, dtype=d, adapter_dtype=a)
    results = measure(gens, args.tasks)
    common = {"tasks": args.tasks, "threads": torch.get_num_threads(), "device": args.device}
    first = next(iter(gens))
    if len(gens) == 1:
        print(json.dumps({**results[first], "checkpoint": gens[first].checkpoint, **common}))
        return
    ratios = {name: round(r["p50_ms"] / results[first]["p50_ms"], 3) for name, r in results.items()}
    print(json.dumps({"variants": results, "p50_over_first": ratios, **common}))


if __name__ == "__main__":
    main()
