"""Demo pools: the few demos a task is described by, picked from many, for each input.

A user often has more labelled examples than fit in one task description (32 demos). With a
pool, each input gets the ``k`` demos that suit it: ``nearest`` (cosine similarity of the
input to each pool input, in the task encoder's space; HyperLoRA's demonstration selection),
``first`` (the pool's first k) or ``random`` (one seeded k-subset for the whole request). The
chosen demos are kept in pool order, so inputs that choose the same demos describe the very
same task: one task hash, one adapter, one engine batch.
"""
from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

from hypergen.errors import TaskError
from hypergen.task import MAX_DEMOS, Demo, Task, canonical_json

MAX_POOL = 1000
METHODS = ("nearest", "first", "random")
POOLS_KEPT = 64  # pools whose input embeddings stay cached


@dataclass(frozen=True)
class Selection:
    k: int = 4
    by: str = "nearest"
    seed: int = 0


def check_pool(own_demos: Sequence[Demo], pool: Sequence[Demo], selection: Selection) -> None:
    """Raises TaskError naming the field: pool size, blank outputs, k, method."""
    if not 1 <= len(pool) <= MAX_POOL:
        raise TaskError(f"needs 1 to {MAX_POOL} demos, got {len(pool)}", "demo_pool")
    for i, demo in enumerate(pool):
        if not demo.output.strip():
            raise TaskError("is empty; every demo needs an output", f"demo_pool.{i}.output")
    if selection.by not in METHODS:
        raise TaskError(f"unknown method {selection.by!r}; use one of {', '.join(METHODS)}", "select.by")
    room = MAX_DEMOS - len(own_demos)
    if not 1 <= selection.k <= min(len(pool), room):
        raise TaskError(f"must be 1 to {min(len(pool), room)} (the pool's size, and {MAX_DEMOS} demos in all)", "select.k")


def pool_hash(pool: Sequence[Demo]) -> str:
    return hashlib.sha256(canonical_json([d.input for d in pool]).encode()).hexdigest()


class PoolSelector:
    """Picks demos from pools for inputs; keeps each pool's input embeddings (by pool hash)."""

    def __init__(self, encoder) -> None:  # noqa: ANN001 (a TaskEncoder)
        self.encoder = encoder
        self._embedded: OrderedDict[str, torch.Tensor] = OrderedDict()

    def tasks_for(self, instruction: str, own_demos: Sequence[Demo], pool: Sequence[Demo], inputs: Sequence[str],
                  selection: Selection) -> list[Task]:
        """One task per input: the instruction, its own demos, then the ones chosen for that input."""
        check_pool(own_demos, pool, selection)
        return [Task(instruction, (*own_demos, *(pool[i] for i in chosen))) for chosen in self.choose(pool, inputs, selection)]

    def choose(self, pool: Sequence[Demo], inputs: Sequence[str], selection: Selection) -> list[list[int]]:
        """Pool indices per input, ascending."""
        k = selection.k
        if selection.by == "first":
            return [list(range(k))] * len(inputs)
        if selection.by == "random":
            return [sorted(random.Random(selection.seed).sample(range(len(pool)), k))] * len(inputs)
        scores = self.encoder.embed(list(inputs)) @ self._pool_vectors(pool).T  # unit vectors: cosine
        # ties go to the earlier pool demo: stable ordering by (-score, index)
        order = torch.sort(-scores, dim=1, stable=True).indices[:, :k]
        return [sorted(row.tolist()) for row in order]

    def _pool_vectors(self, pool: Sequence[Demo]) -> torch.Tensor:
        key = pool_hash(pool)
        if key in self._embedded:
            self._embedded.move_to_end(key)
            return self._embedded[key]
        vectors = self.encoder.embed([d.input for d in pool])
        self._embedded[key] = vectors
        if len(self._embedded) > POOLS_KEPT:
            self._embedded.popitem(last=False)
        return vectors
