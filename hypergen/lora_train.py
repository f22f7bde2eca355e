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
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from hypergen.adapter import TRAINING_FILE, Adapter, peft_key
from hypergen.base_model import load_dims, load_model, load_tokenizer
from hypergen.batching import length_buckets, lm_loss, make_batch
from hypergen.data import TaskData
from hypergen.hypernet import peft_lora_a_init
from hypergen.lora_apply import lora_applied
from hypergen.prompts import prompt_ids, target_ids
from hypergen.spec import LoraSpec
from hypergen.train import TrainConfig, lr_at
from hypergen.train_state import has_state, load_optimizer, save_optimizer, swap_in


def init_lora(spec: LoraSpec, seed: int) -> dict[str, torch.Tensor]:
    """A [L, r, in] drawn as PEFT draws lora_A, B [L, out, r] zero: a no-op start."""
    gen = torch.Generator().manual_seed(seed)
    params = {}
    for m in spec.target_modules:
        r, fan_in = spec.a_shape(m)
        params[f"{m}.A"] = peft_lora_a_init((spec.num_layers, r, fan_in), gen)
        params[f"{m}.B"] = torch.zeros(spec.num_layers, spec.b_shape(m)[0], r)
    return params


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
) -> Path:
    """Trains a LoRA on rows drawn from ``tasks`` (leaving each task's first ``skip_first``
    instances out: the ones an evaluation scores); returns the PEFT folder, which records
    what it was trained on in ``TRAINING_FILE``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    tokenizer = load_tokenizer(config.base_model)
    model = load_model(config.base_model, dtype=config.dtype)
    spec = LoraSpec(load_dims(config.base_model), tuple(config.target_modules), config.rank, config.alpha)
    state_dir = out_dir / "state"
    init = load_file(str(state_dir / "lora.safetensors")) if has_state(state_dir) else init_lora(spec, config.seed)
    params = {k: torch.nn.Parameter(v.float()) for k, v in init.items()}
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)
    step = load_optimizer(optimizer, state_dir) if has_state(state_dir) else 0
    rows_all = [(prompt_ids(tokenizer, t.instruction, inst.input), target_ids(tokenizer, inst.outputs[0]))
                for t in tasks for inst in t.instances[skip_first:]]
    rows_all = [r for r in rows_all if len(r[0]) <= config.max_prompt_tokens]  # never cut a prompt
    buckets = length_buckets(rows_all, lambda r: len(r[0]), config.length_buckets if len(rows_all) >= 4 * batch_size else 1)
    schedule = config.model_copy(update={"lr": lr})
    with open(out_dir / "log.jsonl", "a") as log_file, tqdm(total=steps, initial=step, desc=f"train-lora {out_dir.name}", unit="step") as bar:
        while step < steps:
            rng = random.Random(f"{config.seed}:{step}")
            bucket = rng.choices(buckets, weights=[len(b) for b in buckets])[0]
            rows = [rng.choice(bucket) for _ in range(batch_size)]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(schedule, step, steps)
            start = time.perf_counter()
            weights = {m: (params[f"{m}.A"].unsqueeze(0), params[f"{m}.B"].unsqueeze(0)) for m in spec.target_modules}
            batch = make_batch(rows, tokenizer.pad_token_id or 0, config.max_prompt_tokens, config.max_target_tokens)
            with lora_applied(model, spec, weights, torch.zeros(len(rows), dtype=torch.long)):
                loss = lm_loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), config.grad_clip)
            optimizer.step()
            step += 1
            log_file.write(json.dumps({"step": step, "loss": loss.item(), "seconds": round(time.perf_counter() - start, 3)}) + "\n")
            log_file.flush()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update(1)
            if step % config.checkpoint_every == 0 or step == steps:
                tmp = out_dir / "state.tmp"
                tmp.mkdir(parents=True, exist_ok=True)
                save_file({k: v.detach().contiguous() for k, v in params.items()}, str(tmp / "lora.safetensors"))
                save_optimizer(optimizer, tmp, step)
                swap_in(tmp, state_dir)
    folder = to_adapter(params, spec, config.base_model).save_peft(out_dir / "adapter")
    (folder / TRAINING_FILE).write_text(json.dumps({"tasks": [t.name for t in tasks], "skip_first": skip_first, "steps": steps}))
    return folder
