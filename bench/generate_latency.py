"""Latency of task -> adapter bytes (encode + hypernetwork + serialisation), default spec.

    .venv/bin/python bench/generate_latency.py [--checkpoint DIR] [--tasks 50]

Prints one JSON line. "cold" is the first task after loading; p50/p95 are over
the following distinct tasks (3 demos each), one at a time, with the median of each
stage (encoder, hypernetwork, tensors, serialisation); batch16 is generate_many on 16
new tasks, per task.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

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
    (adapter minus the shared LoRA), and the lowest cosine between the two encoders' embeddings."""
    exact = HyperGenerator.from_pretrained(gen.checkpoint, device=gen.device, dtype="float32")
    shared = exact.shared_adapter().tensors
    worst, lowest = 0.0, 1.0
    for task in tasks:
        a, b = exact.generate(task), gen.generate(task)
        diff = sum(float((a.tensors[k] - b.tensors[k]).norm()) ** 2 for k in a.tensors) ** 0.5
        correction = sum(float((a.tensors[k] - shared[k]).norm()) ** 2 for k in a.tensors) ** 0.5
        worst = max(worst, diff / max(correction, 1e-12))
    texts = [exact.encoder.single(t.instruction) for t in tasks] + [exact.encoder.pair(d.input, d.output) for t in tasks for d in t.demos]
    lowest = float((exact.encoder.embed_ids(texts) * gen.encoder.embed_ids(texts)).sum(-1).min())
    return {"max_adapter_diff_over_correction": worst, "min_embedding_cosine": round(lowest, 6)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", default=get_settings().checkpoint)
    parser.add_argument("--device", default=get_settings().device, help="the hypernetwork's device (HYPERGEN_DEVICE)")
    parser.add_argument("--dtype", default=get_settings().generator_dtype, help="compute dtype of the encoder and hypernetwork (HYPERGEN_GENERATOR_DTYPE)")
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = HyperGenerator.from_pretrained(args.checkpoint, device=args.device, dtype=args.dtype)

    start = time.perf_counter()
    gen.generate(make_task(-1)).to_bytes()
    cold = time.perf_counter() - start

    times = []
    stages: dict[str, list[float]] = {"encode_ms": [], "hypernetwork_ms": [], "tensors_ms": [], "bytes_ms": []}
    for i in range(args.tasks):
        task = make_task(i)
        start = time.perf_counter()
        adapter = gen.generate(task)
        made = time.perf_counter()
        adapter.to_bytes()
        times.append(time.perf_counter() - start)
        for name, value in {**gen.last_timings, "bytes_ms": (time.perf_counter() - made) * 1000}.items():
            stages[name].append(value)
    times.sort()

    batch = [make_task(1000 + i) for i in range(16)]
    start = time.perf_counter()
    for adapter in gen.generate_many(batch):
        adapter.to_bytes()
    batch16 = (time.perf_counter() - start) / 16

    rounding = against_float32(gen, [make_task(i) for i in range(20)]) if gen.compute_dtype != "float32" else None

    print(json.dumps({
        "p50_ms": ms(statistics.median(times)),
        "p95_ms": ms(times[int(0.95 * (len(times) - 1))]),
        "batch16_ms_per_task": ms(batch16),
        "p50_stages_ms": {name: round(statistics.median(values), 2) for name, values in stages.items()},
        "cold_ms": ms(cold),
        "tasks": args.tasks,
        "threads": torch.get_num_threads(),
        "checkpoint": gen.checkpoint,
        "device": args.device,
        "dtype": gen.compute_dtype,
        "vs_float32": rounding,
    }))


if __name__ == "__main__":
    main()
