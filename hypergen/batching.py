"""LM batches for supervised steps: prompt + target token rows, loss on target tokens only."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import torch
from torch import nn

T = TypeVar("T")


@dataclass
class LMBatch:
    input_ids: torch.Tensor  # [B, S], right-padded
    attention_mask: torch.Tensor  # [B, S]
    target_pos: torch.Tensor  # [N] flat positions (b * S + s) whose next token is a target
    target_ids: torch.Tensor  # [N]

    @property
    def target_rows(self) -> torch.Tensor:
        """[N] the batch row each target token belongs to."""
        return self.target_pos // self.input_ids.shape[1]


def make_batch(rows: list[tuple[list[int], list[int]]], pad_id: int, max_prompt: int = 512, max_target: int = 48) -> LMBatch:
    """rows = (prompt_ids, target_ids), loss on the targets.

    Training leaves out rows whose prompt is over ``max_prompt`` (never trains on a cut prompt);
    the cut here (keep the end, the input) only guards a caller that did not. Targets keep their start.
    """
    seqs, spans = [], []
    for prompt, target in rows:
        prompt, target = prompt[-max_prompt:], target[:max_target]
        seqs.append(prompt + target)
        spans.append((len(prompt), len(target)))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    pos, tgt = [], []
    for b, (seq, (p, t)) in enumerate(zip(seqs, spans)):
        ids[b, : len(seq)] = torch.tensor(seq)
        mask[b, : len(seq)] = 1
        for k in range(t):
            pos.append(b * width + p - 1 + k)  # the logit at position p-1+k predicts token p+k
            tgt.append(seq[p + k])
    return LMBatch(ids, mask, torch.tensor(pos), torch.tensor(tgt))


def token_losses(model: nn.Module, batch: LMBatch) -> torch.Tensor:
    """[N] cross-entropy of each target token; the LM head runs on target positions only."""
    hidden = model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    picked = hidden.reshape(-1, hidden.shape[-1])[batch.target_pos]
    logits = model.get_output_embeddings()(picked).float()
    return nn.functional.cross_entropy(logits, batch.target_ids, reduction="none")


def lm_loss(model: nn.Module, batch: LMBatch) -> torch.Tensor:
    """Mean cross-entropy over target tokens."""
    return token_losses(model, batch).mean()


def row_means(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """[n_rows] mean of per-token ``values`` within each row (rows with no targets give 0)."""
    sums = torch.zeros(n_rows, dtype=values.dtype).index_add(0, rows, values)
    counts = torch.zeros(n_rows, dtype=values.dtype).index_add(0, rows, torch.ones_like(values))
    return sums / counts.clamp(min=1)


def length_buckets(items: Sequence[T], length: Callable[[T], int], n: int) -> list[list[T]]:
    """Items sorted by length and cut into ``n`` equal groups: a batch drawn from one group pads little."""
    ordered = sorted(items, key=length)
    n = max(1, min(n, len(ordered)))
    return [ordered[i * len(ordered) // n : (i + 1) * len(ordered) // n] for i in range(n)]
