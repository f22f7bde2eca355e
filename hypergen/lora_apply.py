"""Apply generated LoRAs to a frozen base model without copying it: forward hooks, per-row adapters.

Each target Linear gets a hook that adds ``scaling * (x @ A_b^T) @ B_b^T`` where
A_b, B_b are the adapter of the task that batch row b belongs to. Gradients flow
into A and B (and so into the hypernetwork), never into the base weights.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from hypergen.spec import LoraSpec, module_block


def target_linears(model: nn.Module, spec: LoraSpec) -> dict[tuple[int, str], nn.Linear]:
    """(layer, module) -> the base model's Linear, for Llama-style decoders."""
    layers = model.get_decoder().layers if hasattr(model, "get_decoder") else model.model.layers
    found = {}
    for i, layer in enumerate(layers):
        for module in spec.target_modules:
            found[(i, module)] = getattr(getattr(layer, module_block(module)), module)
    return found


@contextmanager
def lora_applied(
    model: nn.Module,
    spec: LoraSpec,
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]],
    row_task: torch.Tensor,
) -> Iterator[None]:
    """While active, row b of every forward uses task ``row_task[b]``'s adapter.

    ``weights[module] = (A [T, L, r, in], B [T, L, out, r])`` as the hypernetwork returns them.
    """
    handles = []
    scaling = spec.scaling
    for (layer, module), linear in target_linears(model, spec).items():
        a_all, b_all = weights[module]

        def hook(mod: nn.Module, args: tuple, output: torch.Tensor, a_all=a_all, b_all=b_all, layer=layer) -> torch.Tensor:
            x = args[0]
            a = a_all[row_task, layer].to(x.dtype)  # [B, r, in]
            b = b_all[row_task, layer].to(x.dtype)  # [B, out, r]
            low = torch.einsum("bsi,bri->bsr", x, a)
            return output + scaling * torch.einsum("bsr,bor->bso", low, b)

        handles.append(linear.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
