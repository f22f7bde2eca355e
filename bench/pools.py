"""Demo pools (per-input selection, random ensembles) and composition with the shared LoRA, on held-out S-NI.

    .venv/bin/python bench/pools.py --sni ../shared/data/sni --out runs/bench-pools

Every test task of the split; its pool is every instance after the card's 20 scored ones
(31-46 per task), and the 20 scored ones are answered with the card's protocol (greedy, 32
tokens, first line, ROUGE-L and exact match, the default engine, prompt = instruction + input).
Conditions, each an adapter (or one per input) from the default checkpoint:

- ``base``: no adapter; ``generated``: the card's adapter (instruction + 3 demos, from the
  Positive Examples first), as ``hypergen eval`` makes it;
- ``first_kK``, ``nearest_kK``, ``random_kK`` (K = 3 and 8): ``HyperGenerator.generate_for``
  over the pool, ``nearest`` giving each input its own selection (equal selections share one
  adapter), ``random`` one seeded subset for the task (seed 0);
- ``ensemble_kK``: the mean of the adapters of ``--ensemble`` random selections (seeds 0..n-1),
  composed exactly and cut to the engine's rank (``compose(..., "svd")`` with weights 1/n);
- ``shared``: the network's shared LoRA alone (the multi-task part every generated adapter
  corrects; ``HyperGenerator.shared_adapter``); ``mix_gG_sS``: the card's generated adapter
  and the shared LoRA composed with weights G and S (``svd``: their exact weighted sum at rank 8).

Adapters and scores are saved as they finish (rerunning resumes). Writes ``results.json`` and
``pools.md`` (means, per-task wins / ties / losses of the pairs the targets name).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from scoring import SCORED, Item, held_out_demos, score_runs

K_DEMOS = 3  # the card's generated adapter
KS = (3, 8)
BY = ("first", "nearest", "random")
MIXES = ((0.5, 0.5), (1.0, 0.5), (0.5, 1.0))
TIE = 0.5  # ROUGE-L points, as the card


CONDITIONS = ["base", "generated", *(f"{by}_k{k}" for k in KS for by in (*BY, "ensemble")), "shared",
              *(f"mix_g{g:g}_s{s:g}" for g, s in MIXES)]


def build_adapters(args: argparse.Namespace, tasks: list, out: Path) -> dict[str, list[Item]]:
    """Generates (or finds) every condition's adapters; returns the scoring runs, named ``condition/task``."""
    from hypergen.compose import compose
    from hypergen.evaluate import demos_for
    from hypergen.generator import HyperGenerator

    hyper = HyperGenerator.from_pretrained(args.checkpoint)
    store = out / "adapters"

    def saved(adapter) -> Path:  # noqa: ANN001 (Adapter); one folder per distinct adapter
        name = adapter.task_hash or adapter.meta.get("name")
        folder = store / name[:24]
        if not (folder / "adapter_config.json").is_file():
            adapter.save_peft(folder)
        return folder

    shared = hyper.shared_adapter()
    shared.meta["name"] = "shared-" + hyper.fingerprint
    runs: dict[str, list[Item]] = {}
    distinct: dict[str, float] = {}
    for task in tasks:
        pool, scored = held_out_demos(task), task.instances[:SCORED]
        inputs = [i.input for i in scored]
        generated = hyper.generate(task.task(demos_for(task, K_DEMOS, SCORED)))
        per_input: dict[str, list] = {"base": [None] * len(scored), "generated": [saved(generated)] * len(scored),
                                      "shared": [saved(shared)] * len(scored)}
        for k in KS:
            for by in BY:
                adapters = hyper.generate_for(inputs, pool, k, by, instruction=task.instruction, seed=0)
                per_input[f"{by}_k{k}"] = [saved(a) for a in adapters]
                distinct.setdefault(f"{by}_k{k}", 0.0)
                distinct[f"{by}_k{k}"] += len({a.task_hash for a in adapters}) / len(tasks)
            members = [hyper.generate_for(inputs[:1], pool, k, "random", instruction=task.instruction, seed=s)[0]
                       for s in range(args.ensemble)]
            mean = compose([(a, 1 / len(members)) for a in members], "svd")
            mean.meta["name"] = f"ensemble-{k}-{members[0].task_hash}"
            per_input[f"ensemble_k{k}"] = [saved(mean)] * len(scored)
        for g, s in MIXES:
            mixed = compose([(generated, g), (shared, s)], "svd")
            mixed.meta["name"] = f"mix-{g:g}-{s:g}-{generated.task_hash}"
            per_input[f"mix_g{g:g}_s{s:g}"] = [saved(mixed)] * len(scored)
        for condition, folders in per_input.items():
            runs[f"{condition}/{task.name}"] = [Item(task.instruction, i.input, f, i.outputs) for i, f in zip(scored, folders)]
        print(f"adapters for {task.name}: pool {len(pool)}", flush=True)
    (out / "distinct.json").write_text(json.dumps(distinct))
    return runs


def summarise(args: argparse.Namespace, tasks: list, scores: dict[str, dict[str, float]], out: Path) -> dict[str, Any]:
    mean = {c: {m: sum(scores[f"{c}/{t.name}"][m] for t in tasks) / len(tasks) for m in ("rougeL", "exact_match")} for c in CONDITIONS}

    def wtl(a: str, b: str) -> dict[str, int]:
        diffs = [scores[f"{a}/{t.name}"]["rougeL"] - scores[f"{b}/{t.name}"]["rougeL"] for t in tasks]
        return {"wins": sum(d > TIE for d in diffs), "ties": sum(abs(d) <= TIE for d in diffs), "losses": sum(d < -TIE for d in diffs)}

    pairs = [(f"nearest_k{k}", f"first_k{k}") for k in KS] + [(f"nearest_k{k}", f"random_k{k}") for k in KS]
    pairs += [(f"ensemble_k{k}", f"random_k{k}") for k in KS] + [(f"mix_g{g:g}_s{s:g}", other) for g, s in MIXES for other in ("generated", "shared")]
    targets = {f"nearest_k{k} >= first_k{k} + 2 ROUGE-L": {"gain": mean[f"nearest_k{k}"]["rougeL"] - mean[f"first_k{k}"]["rougeL"],
                                                           "met": mean[f"nearest_k{k}"]["rougeL"] >= mean[f"first_k{k}"]["rougeL"] + 2} for k in KS}
    return {
        "setup": {"tasks": [t.name for t in tasks], "pool_sizes": {t.name: len(held_out_demos(t)) for t in tasks}, "scored_per_task": SCORED,
                  "ensemble": args.ensemble, "checkpoint": args.checkpoint,
                  "command": " ".join(["bench/pools.py", *sys.argv[1:]])},
        "mean": mean, "distinct_adapters_per_task": json.loads((out / "distinct.json").read_text()),
        "wins_ties_losses": {f"{a} vs {b}": wtl(a, b) for a, b in pairs}, "targets": targets,
        "per_task": scores,
    }


def write_report(result: dict[str, Any], out: Path) -> None:
    lines = ["| condition | ROUGE-L | exact match | distinct adapters per task |", "| --- | ---: | ---: | ---: |"]
    for c, v in result["mean"].items():
        d = result["distinct_adapters_per_task"].get(c)
        lines.append(f"| `{c}` | {v['rougeL']:.1f} | {v['exact_match']:.1f} | {'' if d is None else f'{d:.1f}'} |")
    lines += ["", "| pair | wins / ties / losses |", "| --- | ---: |"]
    lines += [f"| {p} | {v['wins']} / {v['ties']} / {v['losses']} |" for p, v in result["wins_ties_losses"].items()]
    lines.append("")
    lines += [f"- {name}: {'met' if v['met'] else 'not met'} ({v['gain']:+.1f})" for name, v in result["targets"].items()]
    (out / "pools.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sni", required=True)
    parser.add_argument("--out", default="runs/bench-pools")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, help="only the split's first N tasks (a quick check)")
    parser.add_argument("--ensemble", type=int, default=4, help="random selections averaged in ensemble_kK")
    parser.add_argument("--checkpoint", default="default")
    parser.add_argument("--base-model", default="smollm2-135m-instruct")
    args = parser.parse_args()
    from hypergen.data import load_sni

    out = Path(args.out)
    tasks = load_sni(args.sni, args.split)[: args.limit]
    runs = build_adapters(args, tasks, out)
    scores = score_runs(runs, out, args.base_model)
    result = summarise(args, tasks, scores, out)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    write_report(result, out)


if __name__ == "__main__":
    main()
