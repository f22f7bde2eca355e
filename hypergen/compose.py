"""Composing LoRAs: a weighted combination of adapters of one base model, as a new adapter.

Three methods, each a PEFT-loadable LoRA of the same modules:

- ``linear`` (PEFT's ``add_weighted_adapter(..., "linear")``): A = sum sqrt(w_i s_i) A_i and
  B = sum sqrt(w_i s_i) B_i, with s_i each part's alpha / r. It keeps the parts' rank (they must
  share one), so it fits any engine the parts fit; it is exact for one part with weight > 0 and
  otherwise adds cross terms B_i A_j, which is why it is cheap and approximate.
- ``cat`` (PEFT's ``"cat"``): the factors stacked, rank = sum of ranks; the update is exactly
  sum w_i s_i B_i A_i.
- ``svd``: that exact sum truncated to the largest part rank (its best approximation of that
  rank, computed on the stacked factors, so it never forms a full matrix).

The result keeps the parts' scale (alpha / r) when they share one, else it is 1; what differs is
folded into the factors (so weight 1 leaves a part's factors bit for bit as they were).
"""
from __future__ import annotations

import hashlib
import math
from typing import Sequence

import torch

from hypergen.adapter import Adapter
from hypergen.errors import HypergenError
from hypergen.task import canonical_json

METHODS = ("linear", "cat", "svd")
MAX_PARTS = 8


class ComposeError(HypergenError):
    code = "invalid_composition"


def composition_id(parts: Sequence[tuple[str, float]], method: str, instruction: str = "") -> str:
    """The composed adapter's id: a hash of its parts' ids, their weights, the method, and the
    instruction its prompts use (part of what it serves)."""
    body = {"compose": method, "parts": [[adapter_id, float(weight)] for adapter_id, weight in parts], "instruction": instruction}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def check_weights(weights: Sequence[float]) -> None:
    """Raises ComposeError naming the part: weights are finite and >= 0 (all zero is allowed: the
    base model's answers, as an adapter)."""
    if not 1 <= len(weights) <= MAX_PARTS:
        raise ComposeError(f"give 1 to {MAX_PARTS} parts, got {len(weights)}", "parts")
    for i, weight in enumerate(weights):
        if not math.isfinite(weight) or weight < 0:
            raise ComposeError("a weight must be a finite number >= 0", f"parts.{i}.weight")


def composed_rank(ranks: Sequence[int], method: str) -> int:
    """The rank ``method`` gives parts of these ranks (refusing ``linear`` over unequal ranks)."""
    if method not in METHODS:
        raise ComposeError(f"unknown method {method!r}; use one of {', '.join(METHODS)}", "method")
    if method == "cat":
        return sum(ranks)
    if method == "linear" and len(set(ranks)) > 1:
        raise ComposeError(f"linear needs parts of one rank, got ranks {list(ranks)}; use svd or cat", "method")
    return max(ranks)


def compose(parts: Sequence[tuple[Adapter, float]], method: str = "linear", task_hash: str | None = None) -> Adapter:
    """One adapter from weighted parts (see the module's docstring for what each method means)."""
    check_weights([w for _, w in parts])
    first = parts[0][0]
    for i, (adapter, _) in enumerate(parts):
        if adapter.base_model != first.base_model:
            raise ComposeError(f"adapter for {adapter.base_model!r}, the first is for {first.base_model!r}", f"parts.{i}.adapter_id")
        if list(adapter.target_modules) != list(first.target_modules) or adapter.tensors.keys() != first.tensors.keys():
            raise ComposeError("adapts other modules or layers than the first part", f"parts.{i}.adapter_id")
    rank = composed_rank([a.rank for a, _ in parts], method)
    scales = {a.alpha / a.rank for a, _ in parts}
    scale = scales.pop() if len(scales) == 1 else 1.0
    tensors: dict[str, torch.Tensor] = {}
    for key_a in (k for k in first.tensors if k.endswith("lora_A.weight")):
        key_b = key_a.replace("lora_A", "lora_B")
        # each part's weight (and scale, where it differs from the result's) folded in symmetrically:
        # w s_i B A = scale (c B)(c A) with c = sqrt(w s_i / scale)
        scaled = [(math.sqrt(w * a.alpha / a.rank / scale), a.tensors[key_a].float(), a.tensors[key_b].float()) for a, w in parts]
        if method == "linear":
            a_out = sum(c * a for c, a, _ in scaled)
            b_out = sum(c * b for c, _, b in scaled)
        else:
            a_out = torch.cat([c * a for c, a, _ in scaled], dim=0)
            b_out = torch.cat([c * b for c, _, b in scaled], dim=1)
            if method == "svd":
                a_out, b_out = _truncated(a_out, b_out, rank)
        dtype = first.tensors[key_a].dtype
        tensors[key_a], tensors[key_b] = a_out.to(dtype).contiguous(), b_out.to(dtype).contiguous()
    return Adapter(tensors, first.base_model, list(first.target_modules), rank, scale * rank, task_hash)


def _truncated(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` factors of B A (B [out, R], A [R, in], R >= rank) via QR of each side: R x R work."""
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    root = s[:rank].sqrt()
    new_b = (q_b @ u[:, :rank]) * root
    new_a = root[:, None] * (vh[:rank] @ q_a.T)
    return new_a, new_b
