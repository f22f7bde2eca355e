"""Optimizer state in safetensors + JSON, so resuming a run never unpickles anything."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def save_optimizer(optimizer: torch.optim.Optimizer, directory: Path, step: int) -> None:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in state["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"{pid}.{key}"] = value.contiguous()
            else:
                scalars[f"{pid}.{key}"] = float(value)
    save_file(tensors, str(directory / "optimizer.safetensors"))
    (directory / "trainer.json").write_text(json.dumps({"step": step, "scalars": scalars, "param_groups": state["param_groups"]}))


def load_optimizer(optimizer: torch.optim.Optimizer, directory: Path) -> int:
    """Restores the optimizer; returns the step it was saved at."""
    meta = json.loads((directory / "trainer.json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for key, value in load_file(str(directory / "optimizer.safetensors")).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for key, value in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = torch.tensor(value)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return int(meta["step"])


def swap_in(tmp: Path, final: Path) -> None:
    """Replaces ``final`` by ``tmp`` so an interruption leaves one complete state or the other."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def has_state(directory: Path) -> bool:
    """True when ``directory`` holds a saved state; recovers one a crash left mid-swap (``.old``)."""
    old = directory.with_name(directory.name + ".old")
    if not directory.exists() and (old / "trainer.json").is_file():
        old.rename(directory)
    return (directory / "trainer.json").is_file()
