"""Scoring saved adapters on held-out S-NI instances with the card's protocol, for the benches.

Each named run is a list of (prompt, adapter folder or None, references); its mean ROUGE-L and
exact match are saved as ``scores/NAME.json`` as soon as its chunk finishes, so a stopped bench
resumes and scores only what is missing. One engine (the default one, as ``hypergen eval``
uses), started only when something is left to score.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

SCORED = 20  # the card's scored instances per task (its first 20)
MAX_TOKENS = 32
RUNS_PER_CALL = 8
# distinct adapters per engine call: vLLM 0.32's CPU engine died (KeyError in convert_mapping) with
# 160 distinct adapters in flight and max_loras 8; calls of at most max_loras adapters never did
ADAPTERS_PER_CALL = 8


def held_out_demos(task) -> list:  # noqa: ANN001 (TaskData)
    """A task's instances after the scored ones, as demos (blank outputs left out): what a bench may
    train on, select from or describe the task with, never what it scores."""
    from hypergen.task import Demo

    return [Demo(i.input, i.outputs[0]) for i in task.instances[SCORED:] if i.outputs[0].strip()]


@dataclass(frozen=True)
class Item:
    """One scored answer: the prompt's pieces, the adapter folder (None: the base model), the references."""

    instruction: str
    input: str
    adapter: Path | None
    references: tuple[str, ...]


def score_runs(runs: dict[str, Sequence[Item]], out: Path, base_model: str, max_lora_rank: int = 8) -> dict[str, dict[str, float]]:
    """Mean ROUGE-L / exact match (percent) per run name; runs already scored under ``out`` are read back."""
    from hypergen.base_model import load_tokenizer, resolve_base_model
    from hypergen.engines import OfflineEngine, create_engine, installed_engine
    from hypergen.evaluate import exact_match, rouge_l
    from hypergen.prompts import first_line, prompt_ids
    from hypergen.settings import Settings

    path = lambda name: out / "scores" / f"{name}.json"  # noqa: E731
    pending = [name for name in runs if not path(name).is_file()]
    if pending:
        tokenizer = load_tokenizer(base_model)
        engine = OfflineEngine(create_engine(Settings(engine=installed_engine()), resolve_base_model(base_model), max_lora_rank))
        try:
            for at in range(0, len(pending), RUNS_PER_CALL):
                chunk = pending[at : at + RUNS_PER_CALL]
                items = [(name, item) for name in chunk for item in runs[name]]
                texts = []
                for call in _calls(items):
                    texts += engine.greedy([(prompt_ids(tokenizer, i.instruction, i.input), i.adapter) for _, i in call], MAX_TOKENS)
                values: dict[str, list[tuple[float, float]]] = {name: [] for name in chunk}
                for (name, item), text in zip(items, texts):
                    answer = first_line(text)
                    values[name].append((100 * rouge_l(answer, item.references), 100 * exact_match(answer, item.references)))
                for name, rows in values.items():
                    target = path(name)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    tmp = target.with_suffix(".tmp")
                    tmp.write_text(json.dumps({"rougeL": sum(r for r, _ in rows) / len(rows),
                                               "exact_match": sum(e for _, e in rows) / len(rows)}))
                    os.replace(tmp, target)
                print(f"scored {min(at + RUNS_PER_CALL, len(pending))}/{len(pending)}", flush=True)
        finally:
            engine.close()
    return {name: json.loads(path(name).read_text()) for name in runs}


def _calls(items: list[tuple[str, Item]]) -> list[list[tuple[str, Item]]]:
    """Consecutive pieces of ``items`` with at most ADAPTERS_PER_CALL distinct adapters each."""
    calls: list[list[tuple[str, Item]]] = [[]]
    adapters: set[Path | None] = set()
    for named in items:
        adapter = named[1].adapter
        if adapter is not None and adapter not in adapters and len(adapters - {None}) >= ADAPTERS_PER_CALL:
            calls.append([])
            adapters = set()
        calls[-1].append(named)
        adapters.add(adapter)
    return [c for c in calls if c]
