"""How a task becomes the set of items the hypernetwork reads.

A task is a set of items, each one encoder embedding plus a few surface features,
tagged with its kind. Two layouts exist (the checkpoint's ``demo_encoding`` says
which one it was trained on):

- ``pairs`` (the default): the instruction as one item per encoder window
  (read whole, however long); one item per demo, ``input -> output`` with the
  input shortened from its middle so the output is always read; one item per
  distinct demo output, so the label space is visible as such. Every demo and
  label item carries surface features of its output (case, digits, punctuation,
  length, bracketed option letters, how many demos share it), because the encoder
  is uncased and would otherwise embed ``apple -> APPLE`` like ``apple -> apple``.
- ``joined``: the first layout (instruction and ``input -> output`` lines, each
  cut at the encoder window, no features), kept to measure what the new one adds.
"""
from __future__ import annotations

import math
import string
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from hypergen.encoder import TaskEncoder
from hypergen.task import Task

DemoEncoding = Literal["pairs", "joined"]
KIND_INSTRUCTION, KIND_DEMO, KIND_LABEL = 0, 1, 2
N_KINDS = 3
FEATURES = (
    "upper_share", "lower_share", "first_upper", "all_upper", "title_case", "digit_share", "punct_share",
    "log_chars", "log_words", "starts_bracket", "ends_period", "demo_share", "distinct_ratio",
)
N_FEATURES = len(FEATURES)


def shape_features(text: str, demo_share: float, distinct_ratio: float) -> list[float]:
    """Surface facts of an output that an uncased encoder cannot see (order: ``FEATURES``)."""
    letters = [c for c in text if c.isalpha()]
    n_letters, n_chars = max(1, len(letters)), max(1, len(text))
    stripped = text.strip()
    return [
        sum(c.isupper() for c in letters) / n_letters,
        sum(c.islower() for c in letters) / n_letters,
        float(bool(letters) and letters[0].isupper()),
        float(bool(letters) and all(c.isupper() for c in letters)),
        float(stripped.istitle()),
        sum(c.isdigit() for c in text) / n_chars,
        sum(c in string.punctuation for c in text) / n_chars,
        math.log1p(len(text)) / 8,
        math.log1p(len(text.split())) / 5,
        float(stripped[:1] in "([{"),
        float(stripped.endswith(".")),
        demo_share,
        distinct_ratio,
    ]


@dataclass
class TaskBatch:
    """Several tasks' items, padded into the hypernetwork's set layout."""

    items: torch.Tensor  # [T, N, E + N_FEATURES]
    kinds: torch.Tensor  # [T, N] long
    mask: torch.Tensor  # [T, N] bool, True = present


@dataclass
class _Item:
    ids: list[int]
    kind: int
    features: list[float]


def task_items(encoder: TaskEncoder, task: Task, encoding: DemoEncoding) -> list[_Item]:
    """The items of one task, in a fixed order (instruction, demos, labels)."""
    zero = [0.0] * N_FEATURES
    if encoding == "joined":
        items = [_Item(encoder.single(task.normalized_instruction), KIND_INSTRUCTION, zero)] if task.normalized_instruction else []
        return items + [_Item(encoder.single(f"{d.input} -> {d.output}"), KIND_DEMO, zero) for d in task.demos]
    items = [_Item(ids, KIND_INSTRUCTION, zero) for ids in encoder.chunks(task.normalized_instruction)]
    outputs = [d.output.strip() for d in task.demos]
    counts = {o: outputs.count(o) for o in outputs}
    distinct = len(counts) / max(1, len(outputs))
    for demo, out in zip(task.demos, outputs):
        items.append(_Item(encoder.pair(demo.input, out), KIND_DEMO, shape_features(out, counts[out] / len(outputs), distinct)))
    for out, count in counts.items():  # dict order: first appearance
        items.append(_Item(encoder.single(out), KIND_LABEL, shape_features(out, count / len(outputs), distinct)))
    return items


def encode_tasks(encoder: TaskEncoder, tasks: Sequence[Task], encoding: DemoEncoding = "pairs", device: str = "cpu") -> TaskBatch:
    """One encoder call for every item of every task."""
    per_task = [task_items(encoder, t, encoding) for t in tasks]
    flat = [item for items in per_task for item in items]
    emb = encoder.embed_ids([item.ids for item in flat])
    width = max(1, max(len(items) for items in per_task))
    items = torch.zeros(len(tasks), width, encoder.dim + N_FEATURES, dtype=torch.float32)  # whatever the default dtype
    kinds = torch.zeros(len(tasks), width, dtype=torch.long)
    mask = torch.zeros(len(tasks), width, dtype=torch.bool)
    row = 0
    for t, task_list in enumerate(per_task):
        for n, item in enumerate(task_list):
            items[t, n, : encoder.dim] = emb[row]
            items[t, n, encoder.dim :] = torch.tensor(item.features)
            kinds[t, n] = item.kind
            mask[t, n] = True
            row += 1
    return TaskBatch(items.to(device), kinds.to(device), mask.to(device))
