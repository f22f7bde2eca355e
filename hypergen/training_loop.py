"""The one training loop: schedule, optimiser step, clipping, logging and periodic state.

Used by the hypernetwork trainer (``train.py``) and by plain LoRA training
(``lora_train.py``). Each supplies its loss for one step and how to write and read its
weights; everything else (learning-rate warm-up and cosine decay, AdamW, gradient
clipping, one JSON line per step in ``log.jsonl``, a progress bar, and the resumable
``state`` folder of weights + optimizer in safetensors + JSON) happens here, once.
Each step's sampling is seeded by (seed, step), so a resumed run takes the same next step.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from tqdm import tqdm

from hypergen.train_state import has_state, load_optimizer, save_optimizer, swap_in

LossFn = Callable[[random.Random], tuple[torch.Tensor, dict[str, Any]]]
STATE_DIR = "state"
LOG_FILE = "log.jsonl"


@dataclass(frozen=True)
class Schedule:
    """Linear warm-up to ``lr``, then cosine down to ``min_lr_ratio * lr`` at ``total`` steps."""

    lr: float
    total: int
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1

    def at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total - self.warmup_steps)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class TrainingLoop:
    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        schedule: Schedule,
        run_dir: Path,
        *,
        seed: int = 0,
        grad_clip: float = 1.0,
        weight_decay: float = 0.0,
        checkpoint_every: int = 25,
        rewarm_steps: int = 10,
        desc: str = "train",
    ) -> None:
        self.params = list(params)
        self.schedule = schedule
        self.run_dir = Path(run_dir)
        self.seed = seed
        self.grad_clip = grad_clip
        self.checkpoint_every = checkpoint_every
        self.rewarm_steps = rewarm_steps
        self.desc = desc
        self.optimizer = torch.optim.AdamW(self.params, lr=schedule.lr, weight_decay=weight_decay)
        self.step = 0
        self.rewarm_from: int | None = None  # set when resumed from weights without optimizer state

    def lr(self) -> float:
        """The schedule's rate, re-warmed over ``rewarm_steps`` after a resume without optimizer state."""
        lr = self.schedule.at(self.step)
        if self.rewarm_from is not None:
            lr *= min(1.0, (self.step - self.rewarm_from + 1) / max(1, self.rewarm_steps))
        return lr

    def train_step(self, loss_fn: LossFn) -> dict[str, Any]:
        """One optimiser step on ``loss_fn``'s loss; returns the step's log record."""
        rng = random.Random(f"{self.seed}:{self.step}")
        lr = self.lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        start = time.perf_counter()
        loss, logs = loss_fn(rng)
        self.optimizer.zero_grad(set_to_none=True)
        t_backward = time.perf_counter()
        loss.backward()
        t_optim = time.perf_counter()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.step += 1
        seconds = time.perf_counter() - start
        record = {"step": self.step, "loss": loss.item(), **logs, "lr": lr, "grad_norm": float(grad_norm),
                  "t_backward": round(t_optim - t_backward, 3), "t_optim": round(time.perf_counter() - t_optim, 3),
                  "seconds": round(seconds, 3)}
        if "rows" in logs:
            record["rows_per_s"] = round(logs["rows"] / seconds, 3)
        return record

    def run(self, loss_fn: LossFn, end: int, save: Callable[[], None]) -> None:
        """Steps to ``end``, logging each and calling ``save`` every ``checkpoint_every`` steps and at the end."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / LOG_FILE, "a") as log_file, \
                tqdm(total=self.schedule.total, initial=self.step, desc=self.desc, unit="step") as bar:
            while self.step < end:
                record = self.train_step(loss_fn)
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                bar.set_postfix(loss=f"{record['loss']:.3f}", **({"stage": record["stage"]} if "stage" in record else {}))
                bar.update(1)
                if self.step % self.checkpoint_every == 0 or self.step == end:
                    save()

    # --- state ----------------------------------------------------------------

    def save_state(self, write_weights: Callable[[Path], None]) -> None:
        """Weights (written by the caller) + optimizer + step into ``run_dir/state``, swapped in whole."""
        tmp = self.run_dir / f"{STATE_DIR}.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        write_weights(tmp)
        save_optimizer(self.optimizer, tmp, self.step)
        swap_in(tmp, self.run_dir / STATE_DIR)

    def load_state(self, read_weights: Callable[[Path], None]) -> bool:
        """Exact resume from ``run_dir/state`` when there is one (weights read by the caller)."""
        state = self.run_dir / STATE_DIR
        if not has_state(state):
            return False
        read_weights(state)
        self.step = load_optimizer(self.optimizer, state)
        return True

    def resume_without_optimizer(self, step: int) -> None:
        """Continues at ``step`` with a fresh optimizer: the rate re-warms over ``rewarm_steps``."""
        self.step = self.rewarm_from = step
