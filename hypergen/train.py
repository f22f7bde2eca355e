"""Training the hypernetwork: multi-task SFT through the frozen base model (and optional stages).

``hypergen train CONFIG`` (JSON or YAML, fields of ``TrainConfig``). Each step samples
several tasks, describes each by its instruction and 0..k demos, generates all their
LoRAs in one batched hypernetwork pass, applies them to the frozen base with forward
hooks (no copy of the model), and takes the LM loss on target tokens only. Only the
hypernetwork trains.

Stages, run in the order given in ``stages``:
- ``pretrain`` (HyperT5's hyper-pretraining): the hypernetwork reads one segment of a
  text, the base model continues the next segment under the generated LoRA.
- ``reconstruct`` (Text-to-LoRA): match a library of per-task LoRAs trained with
  ``hypergen train-lora`` (Frobenius distance between generated and library delta-W).
- ``mtf``: multi-task fine-tuning on task instances (the main stage).

The network starts as a no-op or, with ``init_lora``, from a trained multi-task LoRA that
becomes its shared part (``hypernet.py``); the heads then learn a per-task correction.

The constrained loss (HyperLoRA): ``reg_weight`` times the mean squared Frobenius norm
of the correction, scaling * (B A - B_shared A_shared) (with a no-op start, of the whole
generated delta-W), which keeps generated weights well-scaled;
``anchor_weight`` optionally adds a KL term keeping the adapted model close to the
base model on general prompts. Both are logged per step.

The contrastive term (``contrastive_weight``): a task's rows should fit its own adapter
better than another task's. A plain LM loss cannot ask this: each task's loss depends on
its own adapter only, so whichever tasks share a step, a correction gets the same gradient.
Each row also runs, in the same forward, under the adapter of the next task in the step;
a hinge asks that, per task, the mean token loss under the other adapter exceed the own one
by ``contrastive_margin`` nats. It doubles the rows a step runs.

State (hypernetwork, optimizer, step) is saved every ``checkpoint_every`` steps in
safetensors + JSON under ``run_dir/state``; re-running the same command resumes exactly.
Alongside, ``run_dir/weights`` holds the network alone in bf16 in the checkpoint format
(about 22 MB, small enough to commit) with its step: a run that has only that folder
(e.g. a new machine after a session ended) resumes from it with a fresh optimizer and a
short learning-rate re-warm-up (``rewarm_steps``).
Sampling is seeded by (seed, step), so a resumed run takes the same next step.

Cost on a small CPU: prompts are tokenised once; each step draws its tasks from one
length bucket (tasks of similar prompt length) so little of a batch is padding; the
frozen encoder's embeddings are cached (instructions and demos recur); the LM head runs
on target tokens only. Prompts are never cut: a row whose prompt is longer than
``max_prompt_tokens`` is left out of sampling (and counted in the log). Every log line
has rows/s and where the step's time went (``t_hyper``, ``t_forward``, ``t_backward``,
``t_optim``).
"""
from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field

from hypergen.base_model import compute_dtype, load_model, load_tokenizer
from hypergen.batching import LMBatch, length_buckets, make_batch, row_means, token_losses
from hypergen.adapter import PEFT_CONFIG_FILE, Adapter
from hypergen.data import TaskData, load_jsonl_tasks, load_sni
from hypergen.generator import HyperGenerator
from hypergen.hypernet import HyperNetwork
from hypergen.lora_apply import lora_applied
from hypergen.prompts import prompt_ids, target_ids
from hypergen.settings import DEFAULT_BASE_MODEL, DEFAULT_ENCODER
from hypergen.spec import DEFAULT_ALPHA, DEFAULT_RANK, DEFAULT_TARGET_MODULES
from hypergen.synthetic import paraphrase, synthetic_tasks
from hypergen.task import Demo, Task
from hypergen.task_items import DemoEncoding, encode_tasks
from hypergen.train_state import has_state, swap_in
from hypergen.training_loop import STATE_DIR, Schedule, TrainingLoop

log = logging.getLogger(__name__)

ANCHOR_PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three colours.",
    "Explain what a verb is in one sentence.",
    "How many days are in a week?",
    "Give me a synonym for happy.",
]


PROGRESS_FILE = "progress.json"
WEIGHTS_DIR = "weights"  # the network alone in bf16, with its step: what a run commits


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run_dir: str = "runs/hypernet"
    base_model: str = DEFAULT_BASE_MODEL
    encoder: str = DEFAULT_ENCODER
    encoder_layers: int = Field(default=0, ge=0, description="the encoder's first N transformer layers only (faster; encoder.py); 0: all")
    target_modules: list[str] = list(DEFAULT_TARGET_MODULES)
    rank: int = DEFAULT_RANK
    alpha: float = DEFAULT_ALPHA
    d_model: int | None = Field(default=None, description="network widths and depth; unset: HyperNetConfig's defaults")
    d_hidden: int | None = None
    n_blocks: int | None = None
    a_scale: float | None = Field(default=None, description="scale of the A / B corrections the heads emit (how far one Adam step moves them); unset: HyperNetConfig's")
    b_scale: float | None = None
    centered: bool = Field(default=False, description="correction relative to the running mean task (hypernet.py)")
    correction_basis: int | None = Field(default=None, ge=0, description="K learned directions the correction mixes (hypernet.py); 0: entry by entry")
    basis_scale: float | None = None
    demo_encoding: DemoEncoding = Field(default="pairs", description="task items layout (task_items.py); 'joined' is the first one, for ablations")
    init_checkpoint: str | None = Field(default=None, description="start from this checkpoint's weights")
    init_lora: str | None = Field(default=None, description="PEFT folder of a trained LoRA (e.g. the multi-task one) to start the shared part from")

    sni_dir: str | None = None
    sni_split: str = "train"
    sni_limit: int | None = None
    jsonl_tasks: list[str] = Field(default_factory=list)
    synthetic_tasks: int = 0
    paraphrase_prob: float = 0.0
    instruction_dropout: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="share of task descriptions trained without their instruction (demos only), so the network must read demos")
    pretrain_texts: str | None = Field(default=None, description="text file (one document a line); default: the training tasks' inputs")
    lora_library: str | None = Field(default=None, description="folder of PEFT LoRAs named by task, for 'reconstruct'")

    stages: list[Literal["pretrain", "reconstruct", "mtf"]] = ["mtf"]
    steps: int = 250
    pretrain_steps: int = 0
    reconstruct_steps: int = 0
    tasks_per_step: int = 4
    instances_per_task: int = 2
    max_demos: int = 8
    max_prompt_tokens: int = Field(default=1024, description="rows with longer prompts are left out, never cut")
    length_buckets: int = Field(default=4, description="each step draws its tasks from one bucket of similar prompt length")
    max_target_tokens: int = 32

    lr: float = 2e-4
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    reg_weight: float = 1e-3
    anchor_weight: float = 0.0
    contrastive_weight: float = Field(
        default=0.0, ge=0.0,
        description="weight of the contrastive term: each task's rows must fit its own adapter better than the next task's in the step")
    contrastive_margin: float = Field(default=0.1, ge=0.0, description="by this many nats a target token, averaged over the task's rows")
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        default="auto", description="base model's compute dtype; auto: bf16 where the hardware has it, else float32")
    checkpoint_every: int = 25
    rewarm_steps: int = Field(default=10, description="lr warm-up after resuming from bf16 weights without optimizer state")
    seed: int = 0
    threads: int = Field(default=0, description="torch threads; 0 = torch's default (every core)")

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        text = Path(path).read_text()
        data = yaml.safe_load(text) if str(path).endswith((".yaml", ".yml")) else json.loads(text)
        return cls(**(data or {}))

    def stage_plan(self) -> list[tuple[str, int]]:
        counts = {"pretrain": self.pretrain_steps, "reconstruct": self.reconstruct_steps, "mtf": self.steps}
        return [(s, counts[s]) for s in self.stages if counts[s] > 0]

    def schedule(self, total: int, lr: float | None = None) -> Schedule:
        return Schedule(self.lr if lr is None else lr, total, self.warmup_steps, self.min_lr_ratio)

    def loop(self, params, run_dir: str | Path, total: int, lr: float | None = None, desc: str = "train") -> TrainingLoop:
        """The training loop with this config's schedule, optimiser and state settings."""
        return TrainingLoop(
            params, self.schedule(total, lr), Path(run_dir), seed=self.seed, grad_clip=self.grad_clip,
            weight_decay=self.weight_decay, checkpoint_every=self.checkpoint_every, rewarm_steps=self.rewarm_steps, desc=desc,
        )


def delta_sq_norm(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """||scaling * B A||_F^2 per (task, layer) from the r x r Gram matrices (never forms delta-W)."""
    return scaling**2 * ((b.transpose(-1, -2) @ b) * (a @ a.transpose(-1, -2))).sum((-1, -2))


def delta_sq_distance(a1, b1, a2, b2, scaling: float) -> torch.Tensor:
    """||s B1 A1 - s B2 A2||_F^2, also through r x r products."""
    cross = ((b1.transpose(-1, -2) @ b2) * (a1 @ a2.transpose(-1, -2))).sum((-1, -2))
    return delta_sq_norm(a1, b1, scaling) + delta_sq_norm(a2, b2, scaling) - 2 * scaling**2 * cross


def load_training_tasks(config: TrainConfig) -> list[TaskData]:
    tasks: list[TaskData] = []
    if config.sni_dir:
        tasks += load_sni(config.sni_dir, config.sni_split, limit=config.sni_limit)
    for path in config.jsonl_tasks:
        tasks += load_jsonl_tasks(path)
    if config.synthetic_tasks:
        tasks += synthetic_tasks(config.synthetic_tasks, seed=config.seed)
    usable = [t for t in tasks if len(t.instances) >= 2]
    if not usable:
        raise ValueError("no training tasks: set sni_dir, jsonl_tasks or synthetic_tasks")
    return usable


class Trainer:
    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.run_dir = Path(config.run_dir)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.tokenizer = load_tokenizer(config.base_model)
        self.model = load_model(config.base_model, dtype=config.dtype)
        if config.init_checkpoint:
            self.generator = HyperGenerator.from_pretrained(config.init_checkpoint, base_model=config.base_model)
        else:
            spec = {"target_modules": tuple(config.target_modules), "rank": config.rank, "alpha": config.alpha}
            sizes = {k: getattr(config, k) for k in ("d_model", "d_hidden", "n_blocks", "a_scale", "b_scale", "correction_basis", "basis_scale",
                                                     "encoder_layers") if getattr(config, k) is not None}
            self.generator = HyperGenerator.untrained(
                config.base_model, spec, config.encoder, seed=config.seed,
                demo_encoding=config.demo_encoding, centered=config.centered, **sizes,
            )
            if config.init_lora and not self._saved():  # a saved run holds its shared part already
                self.generator.network.load_shared_lora(Adapter.load_peft(config.init_lora).stacked())
        self.generator.encoder.enable_cache()
        self.net: HyperNetwork = self.generator.network.train()
        self.spec = self.net.spec
        self.tasks = load_training_tasks(config)
        self._prompts = self._tokenize_prompts()
        self._buckets = self._length_buckets()
        self.loop = config.loop(self.net.parameters(), self.run_dir, sum(n for _, n in config.stage_plan()))
        self._library: dict[str, Any] | None = None
        self._texts: list[str] | None = None

    # --- sampling -------------------------------------------------------------

    def _tokenize_prompts(self) -> dict[str, list[list[int] | None]]:
        """Each instance's prompt ids, once; None where the prompt is over ``max_prompt_tokens``."""
        prompts: dict[str, list[list[int] | None]] = {}
        self.too_long = 0
        for task in self.tasks:
            ids = [prompt_ids(self.tokenizer, task.instruction, inst.input) for inst in task.instances]
            self.too_long += sum(len(p) > self.config.max_prompt_tokens for p in ids)
            prompts[task.name] = [p if len(p) <= self.config.max_prompt_tokens else None for p in ids]
        self.tasks = [t for t in self.tasks if sum(p is not None for p in prompts[t.name]) >= 2]
        if self.too_long:
            log.warning("%d rows have prompts over %d tokens and are left out", self.too_long, self.config.max_prompt_tokens)
        return prompts

    def _length_buckets(self) -> list[list[TaskData]]:
        """Tasks sorted by median prompt length, cut into ``length_buckets`` groups of equal size."""
        def median_len(task: TaskData) -> int:
            lens = sorted(len(p) for p in self._prompts[task.name] if p is not None)
            return lens[len(lens) // 2]

        n = min(self.config.length_buckets, len(self.tasks) // max(1, self.config.tasks_per_step))
        return length_buckets(self.tasks, median_len, n)

    def _describe(self, task: TaskData, rng: random.Random, exclude: set[int]) -> Task:
        """Instruction (maybe paraphrased) and 0..max_demos demos, never from the scored instances."""
        pool = list(task.demos) + [Demo(inst.input, inst.outputs[0]) for i, inst in enumerate(task.instances)
                                   if i not in exclude and inst.outputs[0].strip()]  # a demo needs an output
        k = rng.randint(0, min(self.config.max_demos, len(pool)))
        instruction = task.instruction
        if self.config.paraphrase_prob and rng.random() < self.config.paraphrase_prob:
            instruction = paraphrase(instruction, rng)
        if self.config.instruction_dropout and pool and rng.random() < self.config.instruction_dropout:
            instruction = ""
        if not instruction.strip() and k == 0:
            k = 1
        return Task(instruction, tuple(rng.sample(pool, k)))

    def sample_mtf(self, rng: random.Random) -> tuple[list[Task], list[tuple[list[int], list[int]]], list[int]]:
        bucket = rng.choices(self._buckets, weights=[len(b) for b in self._buckets])[0]
        picked = rng.sample(bucket, min(self.config.tasks_per_step, len(bucket)))
        descriptions, rows, row_task = [], [], []
        for t, task in enumerate(picked):
            prompts = self._prompts[task.name]
            usable = [i for i, p in enumerate(prompts) if p is not None]
            idx = rng.sample(usable, min(self.config.instances_per_task, len(usable)))
            descriptions.append(self._describe(task, rng, set(idx)))
            rows += [(prompts[i], target_ids(self.tokenizer, task.instances[i].outputs[0])) for i in idx]
            row_task += [t] * len(idx)
        return descriptions, rows, row_task

    def sample_pretrain(self, rng: random.Random):
        if self._texts is None:
            if self.config.pretrain_texts:
                self._texts = [l for l in Path(self.config.pretrain_texts).read_text().splitlines() if len(l.split()) >= 12]
            else:
                self._texts = [f"{t.instruction} {i.input} {i.outputs[0]}" for t in self.tasks for i in t.instances]
                self._texts = [x for x in self._texts if len(x.split()) >= 12]
        descriptions, rows, row_task = [], [], []
        for t in range(self.config.tasks_per_step):
            words = rng.choice(self._texts).split()
            cut1 = len(words) // 2
            cut2 = cut1 + max(2, (len(words) - cut1) // 3)
            descriptions.append(Task(" ".join(words[:cut1])))
            prompt = self.tokenizer(" ".join(words[cut1:cut2]), add_special_tokens=False)["input_ids"]
            target = self.tokenizer(" " + " ".join(words[cut2:]), add_special_tokens=False)["input_ids"]
            rows.append((prompt, target))
            row_task.append(t)
        return descriptions, rows, row_task

    # --- losses ---------------------------------------------------------------

    def _weights(self, descriptions: list[Task]):
        batch = encode_tasks(self.generator.encoder, descriptions, self.net.config.demo_encoding)
        return self.net(batch.items, batch.kinds, batch.mask)

    def _reg(self, weights) -> torch.Tensor:
        """Mean squared norm of the correction (generated delta-W minus the shared one)."""
        shared = self.net.shared()
        dists = [delta_sq_distance(a, b, *shared[m], self.spec.scaling) for m, (a, b) in weights.items()]
        return torch.stack([d.mean() for d in dists]).mean()

    def _anchor(self, weights, n_tasks: int, rng: random.Random) -> torch.Tensor:
        prompts = [prompt_ids(self.tokenizer, "", rng.choice(ANCHOR_PROMPTS)) for _ in range(n_tasks)]
        batch = make_batch([(p, []) for p in prompts], self.tokenizer.pad_token_id or 0)
        with torch.no_grad():
            base = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
        with lora_applied(self.model, self.spec, weights, torch.arange(n_tasks)):
            adapted = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
        kl = torch.nn.functional.kl_div(adapted.log_softmax(-1), base.log_softmax(-1), log_target=True, reduction="none").sum(-1)
        return (kl * batch.attention_mask).sum() / batch.attention_mask.sum()

    def supervised_loss(self, descriptions, rows, row_task, rng) -> tuple[torch.Tensor, dict[str, float]]:
        start = time.perf_counter()
        weights = self._weights(descriptions)
        reg = self._reg(weights)
        t_hyper = time.perf_counter()
        n_tasks = len(descriptions)
        contrast = self.config.contrastive_weight > 0 and n_tasks > 1
        # with the contrastive term, each row also runs under the next task's adapter, in the same forward
        other_task = [(t + 1) % n_tasks for t in row_task] if contrast else []
        batch: LMBatch = make_batch(rows + rows if contrast else rows, self.tokenizer.pad_token_id or 0,
                                    self.config.max_prompt_tokens, self.config.max_target_tokens)
        with lora_applied(self.model, self.spec, weights, torch.tensor(row_task + other_task)):
            tokens = token_losses(self.model, batch)
        own = batch.target_rows < len(rows)
        lm = tokens[own].mean()
        loss = lm + self.config.reg_weight * reg
        logs = {"lm_loss": lm.item(), "reg": reg.item(), "correction_norm": reg.sqrt().item(),
                "rows": len(rows), "tokens": int(batch.attention_mask[: len(rows)].sum()),
                "padded_tokens": batch.attention_mask[: len(rows)].numel(),
                "t_hyper": round(t_hyper - start, 3), "t_forward": round(time.perf_counter() - t_hyper, 3)}
        if contrast:
            per_row = row_means(tokens, batch.target_rows, 2 * len(rows))
            gap = row_means(per_row[len(rows):] - per_row[: len(rows)], torch.tensor(row_task), n_tasks)
            hinge = torch.relu(self.config.contrastive_margin - gap).mean()
            loss = loss + self.config.contrastive_weight * hinge
            logs |= {"contrastive": hinge.item(), "contrast_gap": gap.mean().item()}
        if self.config.anchor_weight:
            anchor = self._anchor(weights, len(descriptions), rng)
            loss = loss + self.config.anchor_weight * anchor
            logs["anchor_kl"] = anchor.item()
        return loss, logs

    def reconstruct_loss(self, rng: random.Random) -> tuple[torch.Tensor, dict[str, float]]:
        if self._library is None:
            self._library = load_lora_library(self.config.lora_library, {t.name: t for t in self.tasks})
        names = rng.sample(sorted(self._library), min(self.config.tasks_per_step, len(self._library)))
        descriptions = [self._library[n][0] for n in names]
        weights = self._weights(descriptions)
        dist = []
        for module, (a, b) in weights.items():
            a_ref = torch.stack([self._library[n][1][module][0] for n in names])
            b_ref = torch.stack([self._library[n][1][module][1] for n in names])
            dist.append(delta_sq_distance(a, b, a_ref, b_ref, self.spec.scaling).mean())
        loss = torch.stack(dist).mean()
        return loss, {"recon_loss": loss.item(), "reg": self._reg(weights).item()}

    # --- loop -----------------------------------------------------------------

    def stage_at(self, step: int) -> str:
        for stage, count in self.config.stage_plan():
            if step < count:
                return stage
            step -= count
        return "mtf"

    @property
    def step(self) -> int:
        return self.loop.step

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.loop.optimizer

    @property
    def rewarm_from(self) -> int | None:
        return self.loop.rewarm_from

    def loss(self, rng: random.Random) -> tuple[torch.Tensor, dict[str, Any]]:
        """The loss of the step the loop is at, for the stage that step belongs to."""
        stage = self.stage_at(self.step)
        if stage == "reconstruct":
            loss, logs = self.reconstruct_loss(rng)
        else:
            sample = self.sample_pretrain(rng) if stage == "pretrain" else self.sample_mtf(rng)
            loss, logs = self.supervised_loss(*sample, rng)
        return loss, {"stage": stage, **logs}

    def train_step(self) -> dict[str, Any]:
        return self.loop.train_step(self.loss)

    def train(self, max_steps: int | None = None) -> Path:
        """Runs (or resumes) to the end of the plan; returns the exported checkpoint folder."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(self.config.model_dump_json(indent=2))
        self.load_state()
        total = self.loop.schedule.total
        end = min(total, self.step + max_steps) if max_steps else total
        self.loop.run(self.loss, end, self.save_state)
        return self.export() if self.step >= total else self.run_dir / "state"

    # --- state ----------------------------------------------------------------

    def save_state(self) -> None:
        """The loop's exact state (network in float32 + optimizer), and beside it the network alone
        in bf16 with its step: small enough to commit, and enough to resume on another machine."""
        self.loop.save_state(lambda folder: self.net.save(folder, dtype=torch.float32))
        weights = self.run_dir / f"{WEIGHTS_DIR}.tmp"
        self.net.save(weights, dtype=torch.bfloat16)
        (weights / PROGRESS_FILE).write_text(json.dumps({"step": self.step}))
        swap_in(weights, self.run_dir / WEIGHTS_DIR)

    def _saved(self) -> bool:
        """Whether this run has state or committed weights to resume from (so its starting LoRA is not needed)."""
        return has_state(self.run_dir / STATE_DIR) or (self.run_dir / WEIGHTS_DIR / PROGRESS_FILE).is_file()

    def load_state(self) -> bool:
        """Exact resume from ``state``; else from ``weights`` (bf16, no optimizer) with a re-warm-up."""
        if self.loop.load_state(self._read_network):
            log.info("resumed %s at step %d", self.run_dir, self.step)
            return True
        weights_dir = self.run_dir / WEIGHTS_DIR
        if (weights_dir / PROGRESS_FILE).is_file():
            self._read_network(weights_dir)
            self.loop.resume_without_optimizer(int(json.loads((weights_dir / PROGRESS_FILE).read_text())["step"]))
            log.warning("resumed %s at step %d from bf16 weights without optimizer state; lr re-warms over %d steps",
                        self.run_dir, self.step, self.config.rewarm_steps)
            return True
        return False

    def _read_network(self, folder: Path) -> None:
        net, _ = HyperNetwork.load(folder)
        self.net.load_state_dict(net.state_dict())

    def export(self) -> Path:
        """The final checkpoint folder (bf16 weights) with its training provenance."""
        self.net.config.training = {
            "stages": self.config.stage_plan(),
            "steps": self.step,
            "tasks": len(self.tasks),
            "sni_split": self.config.sni_split if self.config.sni_dir else None,
            "synthetic_tasks": self.config.synthetic_tasks,
            "init_lora": self.config.init_lora,
            "demo_encoding": self.config.demo_encoding,
            "centered": self.config.centered,
            "rows_left_out_too_long": self.too_long,
            "tasks_per_step": self.config.tasks_per_step,
            "instances_per_task": self.config.instances_per_task,
            "max_demos": self.config.max_demos,
            "lr": self.config.lr,
            "reg_weight": self.config.reg_weight,
            "anchor_weight": self.config.anchor_weight,
            "contrastive_weight": self.config.contrastive_weight,
            "dtype": compute_dtype(self.config.dtype),
        }
        return self.net.save(self.run_dir / "checkpoint", dtype=torch.bfloat16)


def load_lora_library(folder: str | None, tasks: dict[str, TaskData]) -> dict[str, tuple[Task, dict[str, tuple[torch.Tensor, torch.Tensor]]]]:
    """{task name: (description, {module: (A [L, r, in], B [L, out, r])})} from PEFT folders named by task."""
    if not folder:
        raise ValueError("the 'reconstruct' stage needs lora_library")
    library = {}
    for sub in sorted(Path(folder).iterdir()):
        peft_dir = sub / "adapter" if (sub / "adapter" / PEFT_CONFIG_FILE).is_file() else sub  # train-lora's layout too
        if sub.name not in tasks or not (peft_dir / PEFT_CONFIG_FILE).is_file():
            continue
        library[sub.name] = (tasks[sub.name].task(), Adapter.load_peft(peft_dir).stacked())
    if not library:
        raise ValueError(f"no LoRA in {folder} matches a training task name")
    return library
