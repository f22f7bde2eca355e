"""Where a multi-LoRA decode step's time goes on CPU: base model, LoRA ops, LoRA bookkeeping, sampling, scheduling.

    .venv/bin/python bench/lora_profile.py [--requests 64] [--max-tokens 32] [--adapters 0 16]

Runs vLLM in this process (engine core and worker in-process, so one profiler sees everything),
generates ``--requests`` greedy answers of ``--max-tokens`` tokens spread over N distinct adapters
(0: the base model), under cProfile, with hypergen's CPU LoRA ops and with vLLM's own
(HYPERGEN_CPU_LORA_OPS), and splits the wall time by the vLLM functions it was spent in (LoRA ops run inside the model's
forward, logits after it). Prints a
table and one JSON line. Adapters: random-headed untrained hypernetwork outputs (their values do
not change the cost).
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

# (label, function name, file fragment): the largest cumulative time among matching functions (the
# outermost, where one name is nested, e.g. the model's forward in its layers' forwards)
PARTS = [
    ("model forward", "forward", "models/llama.py"),
    ("LoRA ops (linear layers)", "add_lora_linear", ""),
    ("LoRA ops (logits)", "add_lora_logits", ""),
    ("LoRA bookkeeping", "set_active_adapters", "lora/worker_manager.py"),
    ("logits", "compute_logits", "models/llama.py"),
    ("scheduling", "schedule", "v1/core/sched/scheduler.py"),
]


def make_adapters(n: int, root: Path) -> list[Path]:
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from conftest import randomize_heads  # the tests' non-zero adapters

    from hypergen.generator import HyperGenerator
    from hypergen.task import Demo, Task

    gen = HyperGenerator.untrained()
    randomize_heads(gen.network)
    tasks = [Task(f"Profile task {i}.", (Demo("a", f"b{i}"),)) for i in range(n)]
    return [a.save_peft(root / f"a{i}") for i, a in enumerate(gen.generate_many(tasks))]


def profile(llm, prompts: list[str], loras: list | None, max_tokens: int) -> dict[str, float]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    warm = SamplingParams(max_tokens=1, temperature=0.0)
    llm.generate(prompts, warm, lora_request=loras, use_tqdm=False)  # warm-up: every adapter loaded into a slot
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    outs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
    profiler.disable()
    wall = time.perf_counter() - start
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
    result = {"wall_s": wall, "tokens": sum(len(o.outputs[0].token_ids) for o in outs)}
    steps = sum(v[1] for (f, _, name), v in stats.items() if name == "execute_model" and "worker" in f)
    result["engine_steps"] = steps
    for label, name, where in PARTS:
        result[label] = max((v[3] for (f, _, n), v in stats.items() if n == name and where in f), default=0.0)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--adapters", type=int, nargs="+", default=[0, 16])
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    from hypergen.base_model import compute_dtype, resolve_base_model
    from hypergen.engines import cpu_lora

    folders = make_adapters(max(args.adapters), Path(tempfile.mkdtemp()))
    prompts = [f"Question {i}: name a colour and a number." for i in range(args.requests)]
    rows = {}
    for ops, flag in (("hypergen_ops", "1"), ("vllm_ops", "0")):
        os.environ[cpu_lora.ENV] = flag  # read by the plugin, which vLLM loads when the engine starts
        llm = LLM(model=resolve_base_model("smollm2-135m-instruct"), enable_lora=True, max_loras=max(16, max(args.adapters)),
                  max_lora_rank=8, max_cpu_loras=max(64, max(args.adapters)), enforce_eager=True, max_model_len=1024,
                  dtype=compute_dtype("auto"), distributed_executor_backend="uni", seed=0)
        for n in args.adapters:
            loras = [LoRARequest(f"a{i % n}", i % n + 1, str(folders[i % n])) for i in range(args.requests)] if n else None
            rows[f"{ops}/adapters_{n}"] = profile(llm, prompts, loras, args.max_tokens)
        del llm
        if flag == "1":  # back to vLLM's own wrapper for the second engine
            from vllm.platforms import current_platform

            type(current_platform).get_punica_wrapper = classmethod(lambda cls: "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU")
    labels = [label for label, _, _ in PARTS]
    print("| run | wall s | tok/s | ms per step | " + " | ".join(labels) + " |")
    print("| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in labels) + " |")
    for name, r in rows.items():
        cells = [f"{r[l] / r['wall_s']:.0%}" for l in labels]
        print(f"| {name} | {r['wall_s']:.1f} | {r['tokens'] / r['wall_s']:.0f} | {1000 * r['wall_s'] / max(1, r['engine_steps']):.0f} | "
              + " | ".join(cells) + " |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
