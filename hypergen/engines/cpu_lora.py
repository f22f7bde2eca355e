"""A faster multi-LoRA path for vLLM on CPU, shipped as a vLLM plugin.

vLLM's CPU punica ops (``vllm/lora/ops/torch_ops``) copy each token's A and B out of the
stacked adapter weights (``weights[token_index]``, r x (in + out) numbers per token) and apply
them with a batched einsum of matrix-vector products. Here tokens are grouped by adapter slot
instead, and each op is one batched matmul over the groups:

- the batch's tokens are sorted by slot and each group padded to a common width, so ``x`` becomes
  ``[groups, width, in]``: one ``bmm`` with the groups' A (``[groups, in, r]``) shrinks every
  token, and one with their B expands; results go back to their rows by index;
- the adapter weights are read once per group, not copied once per token, and the arithmetic is
  what the LoRA needs (tokens x r x (in + out)) plus the padding;
- groups of very different sizes (prefill: one long prompt beside short ones) go in several
  batches, each padded to within 2x of its largest group, so padding never doubles the work.

A merged projection's slices (q, k, v) that hold adapters are fused into one LoRA (A side by side,
B block-diagonal; ``FusedSlices``), so a layer is two ``bmm`` in all, not two per slice.
The grouping is made once per engine step (``update_metadata``) and used by every layer. Rows
without an adapter (index -1) are left alone (vLLM's reference ops, called directly, index slot
-1, the last one, for them: vLLM PR #48421).

``register`` is the ``vllm.general_plugins`` entry point: vLLM calls it in every engine process;
on the CPU platform, unless ``HYPERGEN_CPU_LORA_OPS=0``, it points vLLM's punica-wrapper lookup
at ``GroupedPunicaWrapperCPU``. GPUs keep vLLM's kernels.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

ENV = "HYPERGEN_CPU_LORA_OPS"
WRAPPER = f"{__name__}.GroupedPunicaWrapperCPU"
MAX_PADDING = 2  # a batch's padded rows stay within this factor of its real rows


@dataclass(frozen=True)
class GroupBatch:
    """Groups of tokens (one adapter slot each) padded to one width, for one ``bmm``."""

    slots: torch.Tensor  # [groups] adapter slot of each group
    slot_ids: frozenset[int]  # the same, for cheap checks
    padded: torch.Tensor  # [groups * width] token behind each padded row (padding repeats the group's first)
    keep: torch.Tensor  # [groups * width] True for real rows
    rows: torch.Tensor  # token of each real row, in padded order
    width: int
    padding: bool  # some rows are padding (else keep is all True)
    in_order: bool  # one batch of every token in order, no padding: no gather or scatter needed
    slot_range: tuple[int, int] | None  # the slots are lo..hi-1 in order: weights are a view, not a copy

    def weights(self, stacked_t: torch.Tensor) -> torch.Tensor:
        """These groups' slots of a [slots, ...] tensor."""
        if self.slot_range is not None:
            return stacked_t[self.slot_range[0] : self.slot_range[1]]
        return stacked_t.index_select(0, self.slots)


def group_tokens(indices: torch.Tensor) -> list[GroupBatch]:
    """Tokens with an adapter (index >= 0) grouped by slot, largest groups first, in batches."""
    tokens = (indices >= 0).nonzero().squeeze(1)
    if tokens.numel() == 0:
        return []
    order = torch.argsort(indices[tokens], stable=True)
    tokens = tokens[order]
    slots, counts = torch.unique_consecutive(indices[tokens], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    by_size = torch.argsort(counts, descending=True, stable=True).tolist()
    sizes = counts.tolist()
    batches, current = [], []
    for g in by_size:
        if current and sizes[g] * MAX_PADDING < sizes[current[0]]:
            batches.append(current)
            current = []
        current.append(g)
    batches.append(current)
    out = []
    for groups in batches:
        width = sizes[groups[0]]
        padded, keep, rows = [], [], []
        for g in groups:
            mine = tokens[starts[g] : starts[g] + sizes[g]]
            padded.append(torch.cat([mine, mine[:1].expand(width - sizes[g])]))
            keep.append(torch.arange(width) < sizes[g])
            rows.append(mine)
        rows_t, keep_t = torch.cat(rows), torch.cat(keep)
        padding = not bool(keep_t.all())
        in_order = not padding and rows_t.numel() == indices.numel() and bool((rows_t == torch.arange(indices.numel())).all())
        ids = slots[groups].tolist()
        contiguous = ids == list(range(ids[0], ids[0] + len(ids)))
        out.append(GroupBatch(slots[groups], frozenset(ids), torch.cat(padded), keep_t, rows_t, width, padding, in_order,
                              (ids[0], ids[0] + len(ids)) if contiguous else None))
    return out


def _flat(stacked: torch.Tensor) -> torch.Tensor:
    """vLLM's [slots, 1, a, b] (or [slots, a, b]) as [slots, a, b]."""
    return stacked.squeeze(1) if stacked.dim() == 4 else stacked


def _per_version(stacked: torch.Tensor, name: str, make):  # noqa: ANN001, ANN202
    """``make(stacked)``, kept on the tensor until its version changes (vLLM writes slots in place)."""
    version = stacked._version
    hit = getattr(stacked, name, None)
    if hit is None or hit[0] != version:
        hit = (version, make(stacked))
        setattr(stacked, name, hit)
    return hit[1]


def transposed(stacked: torch.Tensor) -> torch.Tensor:
    """[slots, b, a] contiguous from vLLM's [slots, (1,) a, b]: the layout ``bmm`` reads fastest,
    made once per weight change rather than on every call."""
    return _per_version(stacked, "_hypergen_t", lambda t: _flat(t).transpose(1, 2).contiguous())


def live_slots(stacked: torch.Tensor) -> frozenset[int]:
    """Slots whose weights are not all zero. vLLM wraps every linear layer and the lm_head and
    zeroes the slots of modules an adapter does not target (k_proj, o_proj, the MLP, lm_head for
    q/v adapters); those cost nothing here. Recomputed only when the weights change (a load
    or an eviction bumps the tensor's version); kept on the tensor itself, so it goes with it."""
    return _per_version(stacked, "_hypergen_live", lambda t: frozenset(_flat(t).flatten(1).any(1).nonzero().flatten().tolist()))


def grouped_shrink(x: torch.Tensor, a_stacked: torch.Tensor, out: torch.Tensor, batches: list[GroupBatch], scale: float) -> None:
    """out[t, :r] = scale * A[slot(t)] x[t] for every token with an adapter (others untouched)."""
    a = _flat(a_stacked)
    rank = a.shape[1]
    live = live_slots(a_stacked)
    for b in batches:
        if live.isdisjoint(b.slot_ids):  # e.g. k_proj of adapters for q and v only
            continue
        xs = x.index_select(0, b.padded).view(len(b.slots), b.width, -1).to(a.dtype)
        h = torch.bmm(xs, a.index_select(0, b.slots).transpose(1, 2))  # [groups, width, r]
        out[b.rows, :rank] = (scale * h.reshape(-1, rank)[b.keep]).to(out.dtype)


def grouped_expand(h: torch.Tensor, b_stacked: torch.Tensor, y: torch.Tensor, batches: list[GroupBatch], offset: int,
                   size: int, add_inputs: bool = True) -> None:
    """y[t, offset:offset+size] (+)= B[slot(t)] h[t] for every token with an adapter."""
    b_all = _flat(b_stacked)
    out_dim, rank = b_all.shape[1:]
    width = min(size, out_dim)
    target = y[:, offset : offset + width]
    live = live_slots(b_stacked)
    for b in batches:
        if add_inputs and live.isdisjoint(b.slot_ids):
            continue
        hs = h[:, :rank].index_select(0, b.padded).view(len(b.slots), b.width, rank).to(b_all.dtype)
        result = torch.bmm(hs, b_all.index_select(0, b.slots).transpose(1, 2)).reshape(-1, out_dim)[b.keep, :width]
        if add_inputs:
            target.index_add_(0, b.rows, result.to(y.dtype))
        else:
            target[b.rows] = result.to(y.dtype)


def grouped_lora(x: torch.Tensor, a_stacked: torch.Tensor, b_stacked: torch.Tensor, y: torch.Tensor,
                 batches: list[GroupBatch], offset: int, size: int, scale: float) -> None:
    """y[t, offset:offset+size] += scale * B[slot(t)] A[slot(t)] x[t]: shrink and expand in one pass
    per batch (two ``bmm``), the rank-r activations never leaving their groups."""
    b_t = transposed(b_stacked)
    _grouped_pass(x, transposed(a_stacked), b_t[:, :, : min(size, b_t.shape[2])], y, batches, offset, scale)


@dataclass(frozen=True)
class FusedSlices:
    """A layer's LoRA slices (q, k, v of a merged projection...) as one LoRA: every slice's A side
    by side ``[slots, in, sum r]`` and their B block-diagonal ``[slots, sum r, span]``, placed at
    the slices' output offsets. One shrink and one expand ``bmm`` then serve all slices, instead of
    two per slice, each with its own gather and scatter of the tokens."""

    a_t: torch.Tensor
    b_t: torch.Tensor
    start: int  # output column of the first live slice; b_t's columns cover start..start+span


def fused_slices(a_stacked: tuple[torch.Tensor, ...], b_stacked: tuple[torch.Tensor, ...],
                 sizes: tuple[int, ...]) -> FusedSlices | None:
    """The fused weights of the slices that hold any adapter (None if fewer than two do); made once
    per weight change, kept on the first A tensor. Slices no adapter targets stay out, so for
    q/v adapters the block holds q and v, and k's columns between them get zeros."""
    versions = tuple((id(t), t._version) for t in (*a_stacked, *b_stacked))  # these tensors, as they are now
    hit = getattr(a_stacked[0], "_hypergen_fused", None)
    if hit is not None and hit[0] == versions:
        return hit[1]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    live = [i for i, a in enumerate(a_stacked) if live_slots(a)]
    fused = None
    if len(live) >= 2:
        a_ts = [transposed(a_stacked[i]) for i in live]
        b_ts = [transposed(b_stacked[i]) for i in live]
        widths = [min(sizes[i], b.shape[2]) for i, b in zip(live, b_ts)]
        start, end = offsets[live[0]], offsets[live[-1]] + widths[-1]
        ranks = [a.shape[2] for a in a_ts]
        b_cat = b_ts[0].new_zeros(b_ts[0].shape[0], sum(ranks), end - start)
        row = 0
        for i, b, width, rank in zip(live, b_ts, widths, ranks):
            col = offsets[i] - start
            b_cat[:, row : row + rank, col : col + width] = b[:, :, :width]
            row += rank
        fused = FusedSlices(torch.cat(a_ts, dim=2).contiguous(), b_cat, start)
    a_stacked[0]._hypergen_fused = (versions, fused)
    return fused


def _grouped_pass(x: torch.Tensor, a_t: torch.Tensor, b_t: torch.Tensor, y: torch.Tensor,
                  batches: list[GroupBatch], offset: int, scale: float) -> None:
    """y[t, offset:offset+out] += scale * (x[t] a_t[slot]) b_t[slot], a_t [slots, in, r], b_t [slots, r, out]."""
    out_dim = b_t.shape[2]
    target = y[:, offset : offset + out_dim]
    for b in batches:
        xs = x if b.in_order else x.index_select(0, b.padded)
        h = torch.bmm(xs.view(len(b.slots), b.width, -1).to(a_t.dtype), b.weights(a_t))
        if scale != 1.0:
            h.mul_(scale)
        result = torch.bmm(h.to(b_t.dtype), b.weights(b_t)).view(-1, out_dim)
        if b.padding:
            result = result[b.keep]
        result = result.to(y.dtype)
        if b.in_order:
            target += result
        else:
            target.index_add_(0, b.rows, result)


def _wrapper_class() -> type:
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    class GroupedPunicaWrapperCPU(PunicaWrapperCPU):
        """vLLM's CPU punica wrapper with grouped shrink/expand (see the module's docstring); the
        token grouping is made once per step, on first use, for every layer."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._batches: list[GroupBatch] | None = None
            self._sampler_batches: list[GroupBatch] | None = None

        def update_metadata(self, *args: Any, **kwargs: Any) -> None:
            super().update_metadata(*args, **kwargs)
            self._batches = self._sampler_batches = None

        @property
        def batches(self) -> list[GroupBatch]:
            """Tokens grouped by slot (the linear layers)."""
            if self._batches is None:
                self._batches = group_tokens(self.token_lora_indices)
            return self._batches

        @property
        def sampler_batches(self) -> list[GroupBatch]:
            """Sampled rows grouped by slot (the logits)."""
            if self._sampler_batches is None:
                self._sampler_batches = group_tokens(self.sampler_indices)
            return self._sampler_batches

        def add_lora_linear(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: tuple[torch.Tensor, ...],
                            lora_b_stacked: tuple[torch.Tensor, ...], scale: float, output_slices: tuple[int, ...],
                            *, buffer: Any = None, **kwargs: Any) -> None:
            """Every linear layer with LoRA support: slices (q, k, v...) whose slots in this batch are
            all zero are skipped, and a layer with none left (o_proj, the MLP for q/v adapters)
            costs a set check."""
            batches = self.batches
            used = frozenset().union(*(b.slot_ids for b in batches))
            flat_y, flat_x = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
            fused = fused_slices(lora_a_stacked, lora_b_stacked, output_slices) if len(lora_a_stacked) > 1 else None
            if fused is not None:  # q and v (say) in one pass
                live = frozenset().union(*(live_slots(a) for a in lora_a_stacked)) & used
                if live:
                    mine = batches if live == used else [g for g in batches if not live.isdisjoint(g.slot_ids)]
                    _grouped_pass(flat_x, fused.a_t, fused.b_t, flat_y, mine, fused.start, scale)
                return
            offset = 0
            for a, b, size in zip(lora_a_stacked, lora_b_stacked, output_slices):
                live = live_slots(a) & used
                if live:
                    mine = batches if live == used else [g for g in batches if not live.isdisjoint(g.slot_ids)]
                    grouped_lora(flat_x, a, b, flat_y, mine, offset, size, scale)
                offset += size

        def add_lora_logits(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: torch.Tensor,
                            lora_b_stacked: torch.Tensor, scale: float, *, buffer: torch.Tensor | None = None,
                            **kwargs: Any) -> None:
            """The lm_head's LoRA. vLLM runs it on every step once LoRA is on (a copy of each row's
            [vocab, r] B); adapters that do not target lm_head have zero A there and cost nothing."""
            flat_y, flat_x = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
            h = torch.zeros(flat_x.shape[0], lora_b_stacked.shape[-1], dtype=torch.float32, device=x.device)
            grouped_shrink(flat_x, lora_a_stacked, h, self.sampler_batches, scale)
            grouped_expand(h, lora_b_stacked, flat_y, self.sampler_batches, 0, flat_y.shape[1], True)

        def add_shrink(self, y: Any, x: torch.Tensor, lora_a_stacked: tuple[torch.Tensor, ...], scale: float,
                       **kwargs: Any) -> None:
            x = x.view(-1, x.shape[-1])
            for i, a in enumerate(lora_a_stacked):
                grouped_shrink(x, a, y[i].view(-1, y[i].shape[-1]), self.batches, scale)

        def add_expand(self, y: torch.Tensor, x: Any, lora_b_stacked: tuple[torch.Tensor, ...],
                       output_slices: tuple[int, ...], offset_start: int = 0, add_inputs: bool = True,
                       **kwargs: Any) -> None:
            flat_y = y.view(-1, y.shape[-1])
            offset = offset_start
            for i, b in enumerate(lora_b_stacked):
                grouped_expand(x[i].view(-1, x[i].shape[-1]), b, flat_y, self.batches, offset, output_slices[i], add_inputs)
                offset += output_slices[i]

    return GroupedPunicaWrapperCPU


def __getattr__(name: str) -> Any:
    """``GroupedPunicaWrapperCPU`` is built on first access, so importing this module needs no vLLM."""
    if name == "GroupedPunicaWrapperCPU":
        cls = _wrapper_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


def enabled() -> bool:
    """The ``cpu_lora_ops`` setting, read from this process's environment (the server exports it)."""
    from hypergen.settings import get_settings

    return get_settings().cpu_lora_ops


def register() -> None:
    """vLLM plugin entry point: on CPU, use the grouped ops unless HYPERGEN_CPU_LORA_OPS is off."""
    if not enabled():
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    platform = type(current_platform)
    platform.get_punica_wrapper = classmethod(lambda cls: WRAPPER)
    log.debug("hypergen: grouped CPU LoRA ops registered")
