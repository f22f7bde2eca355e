"""Composition of adapters (hypergen.compose): what each method's update equals, and bad input."""
from __future__ import annotations

import math

import pytest
import torch

from hypergen.adapter import Adapter, peft_key
from hypergen.compose import ComposeError, compose, composition_id

MODULES = ["q_proj", "v_proj"]
SHAPES = {"q_proj": (24, 16), "v_proj": (8, 16)}  # (out, in)


def adapter(seed: int, rank: int = 4, alpha: float = 8.0, base: str = "tiny") -> Adapter:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(2):
        for m in MODULES:
            out, inp = SHAPES[m]
            tensors[peft_key(layer, m, "A")] = torch.randn(rank, inp, generator=g)
            tensors[peft_key(layer, m, "B")] = torch.randn(out, rank, generator=g)
    return Adapter(tensors, base, list(MODULES), rank, alpha)


def delta(a: Adapter, layer: int, m: str) -> torch.Tensor:
    A, B = a.layer_weights(layer, m)
    return (a.alpha / a.rank) * B.float() @ A.float()


def test_linear_with_weights_one_and_zero_is_the_first_adapter():
    first, second = adapter(1), adapter(2)
    out = compose([(first, 1.0), (second, 0.0)], "linear")
    assert out.rank == first.rank and out.alpha == first.alpha
    assert all(torch.equal(out.tensors[k], first.tensors[k]) for k in first.tensors)  # bit for bit: engines answer alike
    for layer in range(2):
        for m in MODULES:
            assert torch.allclose(delta(out, layer, m), delta(first, layer, m), atol=1e-4)


def test_cat_is_the_exact_weighted_sum_of_updates_and_svd_its_best_approximation():
    first, second = adapter(1), adapter(2, rank=2, alpha=4.0)
    cat = compose([(first, 0.7), (second, 0.3)], "cat")
    svd = compose([(first, 0.7), (second, 0.3)], "svd")
    assert (cat.rank, svd.rank) == (6, 4)
    for layer in range(2):
        for m in MODULES:
            exact = 0.7 * delta(first, layer, m) + 0.3 * delta(second, layer, m)
            assert torch.allclose(delta(cat, layer, m), exact, atol=1e-4)
            best = torch.linalg.svd(exact)
            k = svd.rank
            optimal = best.U[:, :k] @ torch.diag(best.S[:k]) @ best.Vh[:k]
            assert torch.allclose(delta(svd, layer, m), optimal, atol=1e-3)


def test_zero_weights_give_a_no_op_adapter():
    out = compose([(adapter(1), 0.0), (adapter(2), 0.0)], "svd")
    assert all(not t.any() for t in out.tensors.values())


def test_linear_mixes_factors_so_it_differs_from_the_sum_of_updates():
    first, second = adapter(1), adapter(2)
    out = compose([(first, 0.5), (second, 0.5)], "linear")
    exact = 0.5 * delta(first, 0, "q_proj") + 0.5 * delta(second, 0, "q_proj")
    assert not torch.allclose(delta(out, 0, "q_proj"), exact, atol=1e-2)  # cross terms, as in PEFT


def test_the_id_depends_on_parts_weights_and_method():
    parts = [("a" * 64, 1.0), ("b" * 64, 0.5)]
    ids = {composition_id(parts, "linear"), composition_id(parts, "cat"), composition_id(parts[::-1], "linear"),
           composition_id([("a" * 64, 1.0), ("b" * 64, 0.25)], "linear")}
    assert len(ids) == 4
    assert composition_id(parts, "linear") == composition_id([("a" * 64, 1), ("b" * 64, 0.5)], "linear")


@pytest.mark.parametrize("parts, method, field", [
    ([(1, -0.5)], "linear", "parts.0.weight"),
    ([(1, 1.0), (2, math.nan)], "linear", "parts.1.weight"),
    ([(1, math.inf)], "cat", "parts.0.weight"),
    ([(1, 1.0)], "mean", "method"),
    ([(1, 1.0), ("rank2", 1.0)], "linear", "method"),
    ([(1, 1.0), ("other-base", 1.0)], "cat", "parts.1.adapter_id"),
    ([], "linear", "parts"),
])
def test_bad_compositions_name_the_field(parts, method, field):
    made = {"rank2": adapter(3, rank=2), "other-base": adapter(4, base="another")}
    with pytest.raises(ComposeError) as info:
        compose([(made.get(p) or adapter(p), w) for p, w in parts], method)
    assert info.value.field == field
