"""Evaluation on held-out tasks: base, ICL, generated adapters, multi-task LoRA, oracle LoRAs.

Every method sees the same instances with the same prompt format, greedy decoding and
token budget; answers are scored on their first line. Metrics per task (mean over its
instances), then averaged over tasks: ROUGE-L F1 (rouge-score, lower-cased word tokens,
best over the references; unlike S-NI's own scorer, no Porter stemmer, so "walked" and
"walk" do not match and figures run slightly below S-NI's) and exact match (after lower-casing and
removing punctuation, articles and extra spaces), both in percent.

Demos (for ``icl`` and ``generated``) come from the task's Positive Examples, topped up
from instances outside the scored ones; the scored instances are each task's first
``max_instances``, so per-task oracle LoRAs train on the rest. ``generated`` uses
``k_demos`` demos; ``generated_N`` (e.g. ``generated_0``, ``generated_8``) uses N; ``shared`` is
the checkpoint's shared LoRA alone (what every generated adapter corrects), which tells
whether the per-task correction helps on these tasks.
Results are written per (method, task) as they finish, so an interrupted evaluation
resumes where it stopped.

Label adherence: a task is a label-set task when all its instances' references come from
a small set (at most ``MAX_LABELS`` distinct normalised answers, each used by at least two
instances on average); its adherence is the share of answers that are one of those labels.
``wins`` counts, per task, where ``generated`` scores above / within ``TIE_MARGIN`` / below
each baseline in ROUGE-L.
"""
from __future__ import annotations

import json
import logging
import os
import re
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from tqdm import tqdm

from hypergen.adapter import PEFT_CONFIG_FILE, TRAINING_FILE
from hypergen.data import TaskData, load_sni
from hypergen.engines import OfflineEngine, create_engine, installed_engine
from hypergen.prompts import first_line, prompt_ids
from hypergen.task import Demo

log = logging.getLogger(__name__)

METHODS = ("base", "icl", "generated", "shared", "multitask_lora", "oracle_lora")
MAX_LABELS = 10
TIE_MARGIN = 0.5  # ROUGE-L points; closer than this is a tie
GENERATED_N = re.compile(r"^generated_(\d+)$")


@dataclass
class EvalConfig:
    sni_dir: str
    out_dir: str
    split: str = "test"
    tasks: list[str] | None = None
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    max_instances: int = 20
    k_demos: int = 3
    max_tokens: int = 32
    checkpoint: str = "default"
    base_model: str | None = None
    multitask_lora: str | None = None
    oracle_dir: str | None = None
    engine: str = "auto"  # auto: vLLM when installed, else transformers; built like the server's (HYPERGEN_* settings)
    generator_dtype: str = "float32"  # the encoder's and hypernetwork's compute dtype (a server's: HYPERGEN_GENERATOR_DTYPE)


# --- metrics -------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    text = text.lower()
    text = "".join(c for c in text if c not in set(string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def label_set(task: TaskData) -> set[str] | None:
    """The task's labels (normalised) when its references come from a small set, else None."""
    refs = [normalize(o) for inst in task.instances for o in inst.outputs]
    labels = set(refs)
    if not refs or len(labels) > MAX_LABELS or len(refs) < 2 * len(labels):
        return None
    return labels


def exact_match(prediction: str, references: Sequence[str]) -> float:
    return float(any(normalize(prediction) == normalize(r) for r in references))


_SCORER = None


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"])
    return max(_SCORER.score(r, prediction)["rougeL"].fmeasure for r in references)


# --- harness -------------------------------------------------------------------


def demos_for(task: TaskData, k: int, max_instances: int) -> list[Demo]:
    pool = list(task.demos) + [Demo(i.input, i.outputs[0]) for i in task.instances[max_instances:] if i.outputs[0].strip()]
    return pool[:k]


class Evaluation:
    def __init__(self, config: EvalConfig) -> None:
        from hypergen.base_model import load_tokenizer, resolve_base_model
        from hypergen.generator import HyperGenerator
        from hypergen.settings import Settings  # the server's settings: one way to size an engine

        self.config = config
        self.out = Path(config.out_dir)
        (self.out / "partial").mkdir(parents=True, exist_ok=True)
        self.tasks = load_sni(config.sni_dir, config.split, names=config.tasks)
        uses_hyper = any(m in ("generated", "shared") or _demo_count(m) is not None for m in config.methods)
        self.hyper = (HyperGenerator.from_pretrained(config.checkpoint, base_model=config.base_model, dtype=config.generator_dtype)
                      if uses_hyper else None)
        base = config.base_model or (self.hyper.base_model if self.hyper else "smollm2-135m-instruct")
        self.base = base
        self.tokenizer = load_tokenizer(base)
        rank = self.hyper.spec.rank if self.hyper else 8
        self.engine_kind = installed_engine() if config.engine == "auto" else config.engine
        self._engine_settings = (Settings(engine=self.engine_kind), resolve_base_model(base), rank)
        self._check_resume()

    def _check_resume(self) -> None:
        """Partial results are reused only under the same setup (data, budget, checkpoint, baselines)."""
        keys = ("sni_dir", "split", "max_instances", "k_demos", "max_tokens", "multitask_lora", "oracle_dir", "generator_dtype")
        setup = {k: getattr(self.config, k) for k in keys}
        setup["hypernetwork"] = self.hyper.fingerprint if self.hyper else None
        setup["base_model"] = self.base
        setup["engine"] = self.engine_kind
        path = self.out / "eval_setup.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            changed = sorted(k for k in setup if k in saved and saved[k] != setup[k] and saved[k] is not None and setup[k] is not None)
            if changed:
                raise ValueError(f"{self.out} holds results of another setup ({', '.join(changed)} differ); use a new --out")
            setup = {**saved, **{k: v for k, v in setup.items() if v is not None}}
        path.write_text(json.dumps(setup, indent=2))

    def _partial(self, method: str, task: str) -> Path:
        return self.out / "partial" / method / f"{task}.json"

    def _adapter_for(self, method: str, task: TaskData) -> str | None | bool:
        """Adapter folder for a (method, task), None for no adapter, False when the method skips the task."""
        if method in ("base", "icl"):
            return None
        k = self.config.k_demos if method == "generated" else _demo_count(method)
        if k is not None:
            folder = self.out / "adapters" / (task.name if method == "generated" else f"{task.name}.k{k}")
            if not (folder / PEFT_CONFIG_FILE).is_file():
                self.hyper.generate(task.task(demos_for(task, k, self.config.max_instances))).save_peft(folder)
            return str(folder)
        if method == "shared":
            folder = self.out / "adapters" / "_shared"
            if not (folder / PEFT_CONFIG_FILE).is_file():
                self.hyper.shared_adapter().save_peft(folder)
            return str(folder)
        if method == "multitask_lora":
            return self.config.multitask_lora or False
        if method == "oracle_lora":
            folder = Path(self.config.oracle_dir or "") / task.name / "adapter"
            if not (self.config.oracle_dir and (folder / PEFT_CONFIG_FILE).is_file()):
                return False
            self._check_oracle(folder)
            return str(folder)
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")

    def _check_oracle(self, folder: Path) -> None:
        """Refuses an oracle LoRA that may have trained on the instances scored here."""
        record = folder / TRAINING_FILE
        seen = json.loads(record.read_text()).get("skip_first", 0) if record.is_file() else None
        if seen is None or seen < self.config.max_instances:
            why = "does not say which instances it trained on" if seen is None else f"trained on all but the first {seen} instances"
            raise ValueError(f"oracle LoRA {folder} {why}, and the first {self.config.max_instances} are scored; "
                             f"train it with --skip-first {self.config.max_instances}")

    def run(self) -> dict[str, Any]:
        """Runs what is not saved yet (the engine starts only then), then writes the report."""
        engine: OfflineEngine | None = None
        try:
            for method, chunk in self._pending_chunks():
                if engine is None:
                    engine = OfflineEngine(create_engine(*self._engine_settings))
                self._run_chunk(engine, method, chunk)
        finally:
            if engine is not None:
                engine.close()
        return self.report()

    def _pending_chunks(self) -> Iterator[tuple[str, list[TaskData]]]:
        """(method, up to 8 tasks) not yet saved, with a progress bar over all (method, task) units."""
        units = [(m, t) for m in self.config.methods for t in self.tasks if not self._partial(m, t.name).is_file()]
        total = len(self.config.methods) * len(self.tasks)
        with tqdm(total=total, initial=total - len(units), desc="eval", unit="task") as bar:
            for method in self.config.methods:
                pending = [t for m, t in units if m == method]
                for start in range(0, len(pending), 8):
                    chunk = pending[start : start + 8]
                    yield method, chunk
                    bar.set_postfix(method=method)
                    bar.update(len(chunk))

    def _run_chunk(self, engine: OfflineEngine, method: str, chunk: list[TaskData]) -> None:
        """One engine call for a chunk of tasks; results saved per task."""
        requests, owners = [], []
        for task in chunk:
            adapter = self._adapter_for(method, task)
            if adapter is False:  # not saved: a later run that supplies the input runs it
                continue
            demos = demos_for(task, self.config.k_demos, self.config.max_instances) if method == "icl" else ()
            for inst in task.instances[: self.config.max_instances]:
                requests.append((prompt_ids(self.tokenizer, task.instruction, inst.input, demos), adapter))
                owners.append((task, inst))
        texts = engine.greedy(requests, self.config.max_tokens) if requests else []
        per_task: dict[str, list[dict[str, Any]]] = {}
        for (task, inst), text in zip(owners, texts):
            answer = first_line(text)
            per_task.setdefault(task.name, []).append({
                "input": inst.input, "references": list(inst.outputs), "prediction": answer,
                "rougeL": 100 * rouge_l(answer, inst.outputs), "exact_match": 100 * exact_match(answer, inst.outputs),
            })
        for task in chunk:
            if task.name in per_task:
                self._save(method, task, per_task[task.name])

    def _save(self, method: str, task: TaskData, rows: list[dict[str, Any]]) -> None:
        """One task's predictions and scores, written atomically (a killed run leaves no half file)."""
        path = self._partial(method, task.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rows": rows}))
        os.replace(tmp, path)

    def report(self) -> dict[str, Any]:
        tasks: dict[str, dict[str, dict[str, float]]] = {}
        labels = {task.name: label_set(task) for task in self.tasks}
        for method in self.config.methods:
            for task in self.tasks:
                partial = self._partial(method, task.name)
                if not partial.is_file():  # the method skips this task (no adapter for it)
                    continue
                data = json.loads(partial.read_text())
                if not data["rows"]:
                    continue
                rows = data["rows"]
                scores = {
                    "rougeL": round(sum(r["rougeL"] for r in rows) / len(rows), 2),
                    "exact_match": round(sum(r["exact_match"] for r in rows) / len(rows), 2),
                    "n": len(rows),
                }
                if labels[task.name]:
                    hits = sum(normalize(r["prediction"]) in labels[task.name] for r in rows)
                    scores["label_adherence"] = round(100 * hits / len(rows), 2)
                tasks.setdefault(task.name, {})[method] = scores
        methods = {m: _mean([tasks[t][m] for t in tasks if m in tasks[t]]) for m in self.config.methods}
        oracle_tasks = [t for t in tasks if "oracle_lora" in tasks[t]]
        result = {
            "methods": {m: v for m, v in methods.items() if v},
            "tasks": tasks,
            "setup": {
                **{k: v for k, v in asdict(self.config).items() if k not in ("out_dir",)},
                "base_model": self.base,
                "engine": self.engine_kind,
                "hypernetwork": self.hyper.fingerprint if self.hyper else None,
                "n_tasks": len(tasks),
                "decoding": f"greedy, {self.config.max_tokens} tokens, first line of the answer",
                "oracle_subset": oracle_tasks,
                "methods_on_oracle_subset": {m: _mean([tasks[t][m] for t in oracle_tasks if m in tasks[t]]) for m in self.config.methods},
                "label_set_tasks": sorted(t for t, v in labels.items() if v and t in tasks),
                "tie_margin": TIE_MARGIN,
            },
            "wins": wins_ties_losses(tasks),
        }
        (self.out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
        (self.out / "eval.md").write_text(markdown_table(result))
        bar_chart(result, self.out / "eval.png")
        return result


def _demo_count(method: str) -> int | None:
    match = GENERATED_N.match(method)
    return int(match.group(1)) if match else None


def wins_ties_losses(tasks: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, int]]]:
    """{generated method: {baseline: {wins, ties, losses}}} over tasks both were scored on (ROUGE-L)."""
    methods = sorted({m for scores in tasks.values() for m in scores})
    generated = [m for m in methods if m == "generated" or _demo_count(m) is not None]
    baselines = [m for m in ("base", "icl", "shared", "multitask_lora", "oracle_lora") if m in methods]
    out: dict[str, dict[str, dict[str, int]]] = {}
    for g in generated:
        for b in baselines:
            count = {"wins": 0, "ties": 0, "losses": 0}
            for scores in tasks.values():
                if g in scores and b in scores:
                    diff = scores[g]["rougeL"] - scores[b]["rougeL"]
                    count["ties" if abs(diff) < TIE_MARGIN else "wins" if diff > 0 else "losses"] += 1
            out.setdefault(g, {})[b] = count
    return out


def _mean(values: list[dict[str, float]]) -> dict[str, float]:
    if not values:
        return {}
    result = {
        "rougeL": round(sum(v["rougeL"] for v in values) / len(values), 2),
        "exact_match": round(sum(v["exact_match"] for v in values) / len(values), 2),
        "tasks": len(values),
    }
    adherence = [v["label_adherence"] for v in values if "label_adherence" in v]
    if adherence:
        result["label_adherence"] = round(sum(adherence) / len(adherence), 2)
        result["label_set_tasks"] = len(adherence)
    return result


def markdown_table(result: dict[str, Any]) -> str:
    methods = list(result["methods"])
    lines = ["| method | ROUGE-L | exact match | label adherence | tasks |", "| --- | ---: | ---: | ---: | ---: |"]
    for m in methods:
        v = result["methods"][m]
        adherence = f"{v['label_adherence']:.1f}" if "label_adherence" in v else ""
        lines.append(f"| {m} | {v['rougeL']:.1f} | {v['exact_match']:.1f} | {adherence} | {v['tasks']} |")
    if result.get("wins"):
        lines += ["", f"Per-task wins / ties / losses in ROUGE-L (tie: within {result['setup']['tie_margin']} points):", ""]
        baselines = sorted({b for per in result["wins"].values() for b in per})
        lines += ["| method | " + " | ".join(f"vs {b}" for b in baselines) + " |", "| --- |" + " ---: |" * len(baselines)]
        for g, per in result["wins"].items():
            cells = [f"{per[b]['wins']} / {per[b]['ties']} / {per[b]['losses']}" if b in per else "" for b in baselines]
            lines.append(f"| {g} | " + " | ".join(cells) + " |")
    lines += ["", "Per task (ROUGE-L):", "", "| task | " + " | ".join(methods) + " |", "| --- |" + " ---: |" * len(methods)]
    for task, scores in sorted(result["tasks"].items()):
        cells = [f"{scores[m]['rougeL']:.1f}" if m in scores else "" for m in methods]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(result["methods"])
    rouge = [result["methods"][m]["rougeL"] for m in methods]
    em = [result["methods"][m]["exact_match"] for m in methods]
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    x = range(len(methods))
    ax.bar([i - 0.2 for i in x], rouge, width=0.4, label="ROUGE-L")
    ax.bar([i + 0.2 for i in x], em, width=0.4, label="exact match")
    for i, (r, e) in enumerate(zip(rouge, em)):
        ax.text(i - 0.2, r + 0.5, f"{r:.1f}", ha="center", fontsize=8)
        ax.text(i + 0.2, e + 0.5, f"{e:.1f}", ha="center", fontsize=8)
    n_all = result["setup"]["n_tasks"]
    ax.set_xticks(list(x), [m if result["methods"][m]["tasks"] == n_all else f"{m}\n({result['methods'][m]['tasks']} tasks)" for m in methods])
    ax.set_ylabel("percent")
    ax.set_title(f"Held-out S-NI tasks ({result['setup']['n_tasks']}), {result['setup']['base_model']}")
    ax.legend()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
