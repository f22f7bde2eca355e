"""Refining from the generated adapter vs from PEFT's default start, on held-out S-NI tasks.

    .venv/bin/python bench/refine.py --sni ../shared/data/sni --out runs/bench-refine

For each task (every 4th of the test split in file order, the first six: a fixed rule, not
chosen by score) and each example count (16, and 64 or as many as the task has), the
examples are the task's first non-scored instances (the card scores the first 20). Three
starts are scored on the card's 20 scored instances, with the card's protocol (greedy, 32
tokens, first line, ROUGE-L and exact match, the default engine):

- ``generated``: the adapter the default checkpoint generates from the task's instruction and
  3 demos (as ``hypergen eval``'s ``generated``), not refined;
- ``from_generated``: ``hypergen.refine`` of that adapter for 10, 30 and 100 steps;
- ``from_default``: the same training from PEFT's default start (A random, B zero).

Each step count is its own run (its own warm-up and cosine schedule), as a user asking for
that many steps gets. Training runs one at a time on the CPU; seconds per step come from the
runs' own logs. Everything is saved as it finishes (adapters, scores), so an interrupted
bench resumes. Writes ``results.json``, ``refine.md`` (tables, targets) and ``refine.png``
(score vs steps for both starts).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from scoring import SCORED, held_out_demos

TEST_EVERY = 4
N_TASKS = 6
K_DEMOS = 3
STARTS = ("from_generated", "from_default")
UNREFINED = ("base", "generated")  # step 0 of the two starts (B = 0 at PEFT's start: the base model)


def pick_tasks(sni: str, count: int) -> list:
    from hypergen.data import load_sni

    names = Path(sni, "splits", "test_tasks.txt").read_text().split()[::TEST_EVERY][:count]
    return load_sni(sni, "test", names=names)


def examples_of(task, n: int) -> list:
    return held_out_demos(task)[:n]


def plan(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(start, steps) pairs to run: every --steps from the generated start, --default-steps (default:
    the same) from PEFT's start."""
    default_steps = args.default_steps or args.steps
    return [("from_generated", s) for s in args.steps] + [("from_default", s) for s in default_steps]


def key(task: str, n: int | str, start: str | None = None, steps: int | None = None) -> str:
    """A score's or adapter's name: ``task/base``, ``task/generated`` or ``task/n16/from_default/s30``."""
    return f"{task}/{n}" if start is None else f"{task}/n{n}/{start}/s{steps}"


def train_all(args: argparse.Namespace, tasks: list, out: Path) -> dict[str, float]:
    """Generates and refines every adapter not saved yet; returns seconds per step by run key."""
    from hypergen.adapter import Adapter
    from hypergen.evaluate import demos_for
    from hypergen.generator import HyperGenerator
    from hypergen.refine import refine

    hyper = HyperGenerator.from_pretrained(args.checkpoint)
    # longest runs first: stopped early, the bench can still be rerun with fewer --steps and report them
    runs = [(t, n, s, steps) for s, steps in sorted(plan(args), key=lambda p: -p[1]) for n in args.examples for t in tasks]
    timings: dict[str, float] = {}
    for i, (task, n, start, steps) in enumerate(runs, 1):
        generated = out / "adapters" / key(task.name, "generated")
        if not (generated / "adapter_config.json").is_file():
            hyper.generate(task.task(demos_for(task, K_DEMOS, SCORED))).save_peft(generated)
        name = key(task.name, n, start, steps)
        folder, work = out / "adapters" / name, out / "work" / name
        if not (folder / "adapter_config.json").is_file():
            examples = examples_of(task, n)
            began = time.perf_counter()
            refined = refine(Adapter.load_peft(generated), examples, instruction=task.instruction, steps=steps,
                             lr=args.lr, batch_size=args.batch_size, seed=args.seed, work_dir=work,
                             from_weights=start == "from_generated")
            refined.save_peft(folder)
            print(f"[{i}/{len(runs)}] {name}: {len(examples)} examples, {steps} steps in "
                  f"{time.perf_counter() - began:.0f} s", flush=True)
        timings[name] = _seconds_per_step(work)
    return timings


def _seconds_per_step(work: Path) -> float:
    from hypergen.training_loop import LOG_FILE

    path = work / LOG_FILE
    if not path.is_file():
        return float("nan")
    seconds = [json.loads(line)["seconds"] for line in path.read_text().splitlines() if line.strip()]
    return sum(seconds) / max(1, len(seconds))


def score_all(args: argparse.Namespace, tasks: list, out: Path) -> dict[str, dict[str, float]]:
    """Scores every saved adapter not scored yet (``bench/scoring.py``)."""
    from scoring import Item, score_runs

    by_name = {t.name: t for t in tasks}
    names = [key(t.name, m) for t in tasks for m in UNREFINED] + [key(t.name, n, s, k) for t in tasks for n in args.examples for s, k in plan(args)]
    runs = {}
    for name in names:
        task = by_name[name.split("/")[0]]
        folder = None if name.endswith("/base") else out / "adapters" / name
        runs[name] = [Item(task.instruction, i.input, folder, i.outputs) for i in task.instances[:SCORED]]
    return score_runs(runs, out, args.base_model)


def summarise(args: argparse.Namespace, tasks: list, scores: dict, timings: dict) -> dict[str, Any]:
    """Mean over tasks per (examples, start, steps), the targets, and seconds per step."""
    def mean(names: list[str], metric: str) -> float:
        return sum(scores[n][metric] for n in names) / len(names)

    counts = {n: {t.name: len(examples_of(t, n)) for t in tasks} for n in args.examples}
    table: dict[str, Any] = {u: {m: mean([key(t.name, u) for t in tasks], m) for m in ("rougeL", "exact_match")} for u in UNREFINED}
    for n in args.examples:
        for start, steps in plan(args):
            names = [key(t.name, n, start, steps) for t in tasks]
            table[f"n{n}/{start}/s{steps}"] = {m: mean(names, m) for m in ("rougeL", "exact_match")}
    targets = {}
    top = max(s for start, s in plan(args) if start == "from_default")
    low = min((s for s in args.steps if s >= 30), default=max(args.steps))
    for n in args.examples:
        default_top = table[f"n{n}/from_default/s{top}"]["rougeL"]
        reached = [s for s in args.steps if table[f"n{n}/from_generated/s{s}"]["rougeL"] >= default_top]
        targets[f"n{n}: generated start reaches default's {top}-step score in <= {low} steps"] = {
            "default_at_top": default_top, "first_step_count_reaching_it": min(reached) if reached else None,
            "met": bool(reached) and min(reached) <= low}
        gain = table[f"n{n}/from_generated/s{top}"]["rougeL"] - table["generated"]["rougeL"]
        targets[f"n{n}: refined ({top} steps) >= generated + 10 ROUGE-L"] = {"gain": gain, "met": gain >= 10}
    seconds = [v for v in timings.values() if v == v]
    return {
        "setup": {"tasks": [t.name for t in tasks], "examples_requested": args.examples, "examples_used": counts,
                  "runs": plan(args), "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed, "scored_per_task": SCORED,
                  "checkpoint": args.checkpoint, "command": " ".join(["bench/refine.py", *sys.argv[1:]])},
        "mean": table, "targets": targets,
        "per_task": {n: v for n, v in scores.items()},
        "seconds_per_step": {"mean": sum(seconds) / max(1, len(seconds)), "by_run": timings},
    }


def write_report(result: dict[str, Any], out: Path, examples: list[int], runs: list[tuple[str, int]]) -> None:
    steps = sorted({s for _, s in runs})
    lines = ["| examples | start | " + " | ".join(f"{s} steps" for s in steps) + " |",
             "| --- | --- | " + " | ".join("---:" for _ in steps) + " |"]
    for n in examples:
        for start in STARTS:
            cells = [f"{result['mean'][f'n{n}/{start}/s{s}']['rougeL']:.1f}" if (start, s) in runs else "-" for s in steps]
            lines.append(f"| {n} | {start} | " + " | ".join(cells) + " |")
    lines.append(f"\nnot refined: generated {result['mean']['generated']['rougeL']:.1f}, base model {result['mean']['base']['rougeL']:.1f} ROUGE-L")
    lines.append(f"seconds per step (mean over runs): {result['seconds_per_step']['mean']:.2f}\n")
    for name, value in result["targets"].items():
        lines.append(f"- {name}: {'met' if value['met'] else 'not met'} ({json.dumps(value)})")
    (out / "refine.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(examples), figsize=(4.2 * len(examples), 3.4), dpi=110, squeeze=False)
    for ax, n in zip(axes[0], examples):
        for start, at_zero, style in zip(STARTS, UNREFINED[::-1], ("o-", "s--")):
            xs = [s for s in steps if (start, s) in runs]
            ys = [result["mean"][at_zero]["rougeL"], *[result["mean"][f"n{n}/{start}/s{s}"]["rougeL"] for s in xs]]
            ax.plot([0, *xs], ys, style, label=start.replace("_", " "))
        ax.set_title(f"{n} examples (mean of {len(result['setup']['tasks'])} test tasks)")
        ax.set_xlabel("refine steps")
        ax.set_ylabel("ROUGE-L")
        ax.legend()
    fig.savefig(out / "refine.png", bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sni", required=True)
    parser.add_argument("--out", default="runs/bench-refine")
    parser.add_argument("--tasks", type=int, default=N_TASKS)
    parser.add_argument("--examples", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 30, 100])
    parser.add_argument("--default-steps", type=int, nargs="+", help="step counts from PEFT's start (default: --steps)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step (refine's default: 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default="default")
    parser.add_argument("--base-model", default="smollm2-135m-instruct")
    args = parser.parse_args()
    args.steps = sorted(args.steps)
    out = Path(args.out)
    tasks = pick_tasks(args.sni, args.tasks)
    timings = train_all(args, tasks, out)
    scores = score_all(args, tasks, out)
    result = summarise(args, tasks, scores, timings)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    write_report(result, out, args.examples, plan(args))


if __name__ == "__main__":
    main()
