"""Refining a generated adapter on the user's own examples: LoRA training that starts from it.

A generated adapter is a zero-shot start; with examples of their own, users take the next
step here. ``refine`` is ``train_lora`` (the same prompts, hooks, loss and training loop)
with the adapter's A and B as the starting point and one task's examples as the data, so the
result is an ordinary LoRA of the same shape. Deterministic for a fixed seed.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

from hypergen.adapter import Adapter
from hypergen.data import Instance, TaskData
from hypergen.errors import HypergenError
from hypergen.task import Demo

MIN_EXAMPLES = 2
MAX_EXAMPLES = 4096
MAX_STEPS = 5000


class RefineError(HypergenError):
    code = "invalid_refine"


def check_refine(examples: Sequence[Demo], steps: int, lr: float) -> None:
    """Raises RefineError naming the field: example count, blank outputs, steps, lr."""
    if not MIN_EXAMPLES <= len(examples) <= MAX_EXAMPLES:
        raise RefineError(f"needs {MIN_EXAMPLES} to {MAX_EXAMPLES} examples, got {len(examples)}", "examples")
    for i, example in enumerate(examples):
        if not example.output.strip():
            raise RefineError("an example needs a non-blank output", f"examples.{i}.output")
    if not 1 <= steps <= MAX_STEPS:
        raise RefineError(f"must be 1 to {MAX_STEPS}", "steps")
    if not 0 < lr <= 1e-2:
        raise RefineError("must be in (0, 0.01]", "lr")


def refine(
    adapter: Adapter,
    examples: Sequence[Demo],
    *,
    instruction: str = "",
    base_model: str | None = None,
    steps: int = 100,
    lr: float = 1e-3,
    batch_size: int = 8,
    seed: int = 0,
    work_dir: str | Path | None = None,
    from_weights: bool = True,
) -> Adapter:
    """The adapter fine-tuned on ``examples`` (prompts: ``instruction`` + each input, as served;
    pass the instruction the adapter was generated for).

    ``work_dir`` keeps the run's log and resumable state (a temporary folder otherwise).
    ``from_weights=False`` runs the same training from PEFT's default start (A random, B zero)
    with the adapter's shape: the baseline that shows what the generated start is worth.
    """
    from hypergen.lora_train import train_lora
    from hypergen.train import TrainConfig

    check_refine(examples, steps, lr)
    config = TrainConfig(
        base_model=base_model or adapter.base_model, target_modules=list(adapter.target_modules), rank=adapter.rank,
        alpha=adapter.alpha, seed=seed, warmup_steps=max(1, min(10, steps // 10)), checkpoint_every=max(25, steps // 4),
    )
    task = TaskData("refine", instruction, [], [Instance(e.input, (e.output,)) for e in examples])
    with tempfile.TemporaryDirectory(prefix="hypergen-refine-") as tmp:
        folder = train_lora([task], Path(work_dir or tmp), config, steps, batch_size=batch_size, lr=lr,
                            start=adapter if from_weights else None)
        refined = Adapter.load_peft(folder)
    refined.base_model = adapter.base_model
    return refined
