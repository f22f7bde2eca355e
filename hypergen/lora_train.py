"""Ordinary LoRAs, the baselines the hypernetwork is measured against.

``hypergen train-lora``: one LoRA on one task's instances (the per-task oracle, and
the library for the reconstruction stage), or on all training tasks at once (the
multi-task LoRA). Same spec, prompts (instruction + input, no demos), loss, schedule
and LoRA application (forward hooks on the frozen base) as hypernetwork training;
the result is saved as a standard PEFT folder. Resumable the same way.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hypergen.adapter import TRAINING_FILE, Adapter, peft_key
from hypergen.base_model import load_dims, load_model, load_tokenizer
from hypergen.batching import length_buckets, lm_loss, make_batch
from hypergen.data import TaskData
from hypergen.errors import HypergenError, SpecError
from hypergen.hypernet import noop_lora
from hypergen.lora_apply import lora_applied
from hypergen.prompts import prompt_ids, target_ids
from hypergen.spec import LoraSpec
from hypergen.train import TrainConfig

LORA_STATE_FILE = "lora.safetensors"


def init_lora(spec: LoraSpec, seed: int) -> dict[str, torch.Tensor]:
    """The trainable tensors ({module}.A, {module}.B) of a no-op LoRA, as PEFT starts one."""
    return _flat(noop_lora(spec, torch.Generator().manual_seed(seed)))


def flat_lora(adapter: Adapter, spec: LoraSpec) -> dict[str, torch.Tensor]:
    """An adapter's weights as the trainable tensors; refuses one whose layout differs from ``spec``."""
    if (list(adapter.target_modules), adapter.rank) != (list(spec.target_modules), spec.rank):
        raise SpecError(
            f"the adapter has rank {adapter.rank} on {adapter.target_modules}; training expects rank {spec.rank} on "
            f"{list(spec.target_modules)}", "adapter",
        )
    return _flat(adapter.stacked())


def _flat(stacked: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{module: (A, B)} -> {'{module}.A': A, '{module}.B': B}, the trainable tensors' names."""
    return {f"{m}.{w}": t for m, (a, b) in stacked.items() for w, t in (("A", a), ("B", b))}


def to_adapter(params: dict[str, torch.Tensor], spec: LoraSpec, base_model: str) -> Adapter:
    tensors = {}
    for m in spec.target_modules:
        for layer in range(spec.num_layers):
            tensors[peft_key(layer, m, "A")] = params[f"{m}.A"][layer].detach().clone()
            tensors[peft_key(layer, m, "B")] = params[f"{m}.B"][layer].detach().clone()
    return Adapter(tensors, base_model, list(spec.target_modules), spec.rank, spec.alpha)


def train_lora(
    tasks: list[TaskData],
    out_dir: str | Path,
    config: TrainConfig,
    steps: int,
    batch_size: int = 8,
    lr: float = 1e-3,
    skip_first: int = 0,
    start: Adapter | None = None,
) -> Path:
    """Trains a LoRA on rows drawn from ``tasks`` (leaving each task's first ``skip_first``
    instances out: the ones an evaluation scores); returns the PEFT folder, which records
    what it was trained on in ``TRAINING_FILE``. It starts from ``start``'s weights when given
    (refinement), else as PEFT starts a LoRA."""
    out_dir = Path(out_dir)
    if config.threads:
        torch.set_num_threads(config.threads)
    tokenizer = load_tokenizer(config.base_model)
    model = load_model(config.base_model, dtype=config.dtype)
    spec = LoraSpec(load_dims(config.base_model), tuple(config.target_modules), config.rank, config.alpha)
    first = init_lora(spec, config.seed) if start is None else flat_lora(start, spec)
    params = {k: torch.nn.Parameter(v) for k, v in first.items()}
    loop = config.loop(params.values(), out_dir, steps, lr=lr, desc=f"train-lora {out_dir.name}")

    def read(folder: Path) -> None:
        with torch.no_grad():
            for k, v in load_file(str(folder / LORA_STATE_FILE)).items():
                params[k].copy_(v)

    loop.load_state(read)
    rows_all = [(prompt_ids(tokenizer, t.instruction, inst.input), target_ids(tokenizer, inst.outputs[0]))
                for t in tasks for inst in t.instances[skip_first:]]
    rows_all = [r for r in rows_all if len(r[0]) <= config.max_prompt_tokens]  # never cut a prompt
    if not rows_all:
        raise HypergenError(f"no example has a prompt of at most {config.max_prompt_tokens} tokens", "examples")
    buckets = length_buckets(rows_all, lambda r: len(r[0]), config.length_buckets if len(rows_all) >= 4 * batch_size else 1)

    def loss(rng: random.Random) -> tuple[torch.Tensor, dict[str, int]]:
        bucket = rng.choices(buckets, weights=[len(b) for b in buckets])[0]
        rows = [rng.choice(bucket) for _ in range(batch_size)]
        weights = {m: (params[f"{m}.A"].unsqueeze(0), params[f"{m}.B"].unsqueeze(0)) for m in spec.target_modules}
        batch = make_batch(rows, tokenizer.pad_token_id or 0, config.max_prompt_tokens, config.max_target_tokens)
        with lora_applied(model, spec, weights, torch.zeros(len(rows), dtype=torch.long)):
            return lm_loss(model, batch), {"rows": len(rows)}

    def write(folder: Path) -> None:
        save_file({k: v.detach().contiguous() for k, v in params.items()}, str(folder / LORA_STATE_FILE))

    loop.run(loss, steps, lambda: loop.save_state(write))
    folder = to_adapter(params, spec, config.base_model).save_peft(out_dir / "adapter")
    (folder / TRAINING_FILE).write_text(json.dumps({"tasks": [t.name for t in tasks], "skip_first": skip_first, "steps": steps}))
    return folder
