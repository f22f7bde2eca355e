"""Linear layers with oneDNN-reordered weights (hypergen/packed_linear.py): equal to nn.Linear to
rounding, same parameters and state dict, gradients through the plain path, in-place edits seen."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hypergen.packed_linear import PackedLinear, pack_linears, packing_available

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN reordered linear")


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Sequential(nn.Linear(40, 8, bias=False)), nn.LayerNorm(8))


@pytest.mark.parametrize("shape", [(1, 24), (37, 24), (3, 5, 24)])
def test_packed_layers_compute_what_the_plain_ones_do_on_the_same_parameters(shape):
    plain, packed = model(), pack_linears(model())
    assert type(packed[0]) is PackedLinear and type(packed[2][0]) is PackedLinear
    assert packed[2][0].bias is None
    x = torch.randn(*shape)
    with torch.no_grad():
        expected, got = plain(x), packed(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert packed.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(packed.state_dict().values(), plain.state_dict().values()))


def test_a_weight_edited_in_place_is_reordered_again():
    layer = pack_linears(nn.Sequential(nn.Linear(16, 16)))[0]
    x = torch.randn(4, 16)
    with torch.no_grad():
        before = layer(x)
        layer.weight.mul_(2)
        after = layer(x)
    torch.testing.assert_close(after - layer.bias, 2 * (before - layer.bias), rtol=1e-5, atol=1e-5)


def test_a_packed_model_can_be_deep_copied_and_the_copy_computes_alike():
    packed = pack_linears(model())
    x = torch.randn(5, 24)
    with torch.no_grad():
        expected = packed(x)  # reorders: the opaque tensor now exists
        twin = copy.deepcopy(packed)
        torch.testing.assert_close(twin(x), expected)
    assert twin[0].weight is not packed[0].weight and twin[0]._packed[1] is not packed[0]._packed[1]


def test_training_takes_the_plain_path_and_gradients_reach_the_weights():
    plain, packed = model(), pack_linears(model())
    x = torch.randn(6, 24)
    plain(x).sum().backward()
    packed(x).sum().backward()
    torch.testing.assert_close(packed[0].weight.grad, plain[0].weight.grad)
    assert packed[0]._packed is None  # never reordered: no inference call was made


def test_bf16_and_subclassed_linears_are_left_to_torch():
    attention = nn.MultiheadAttention(16, 2)
    pack_linears(attention)
    assert type(attention.out_proj) is not PackedLinear  # its own subclass, read directly by attention
    layer = pack_linears(nn.Sequential(nn.Linear(16, 16).to(torch.bfloat16)))[0]
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        out = layer(x)
    assert layer._packed is None and out.dtype == torch.bfloat16


def test_the_generators_encoder_and_network_compute_through_reordered_weights(generator, monkeypatch):
    """What the server runs: a float32 generator on the CPU packs both, and its adapters are what
    the plain layers give (the session's generator is float32: conftest)."""
    encoder_layers = [m for m in generator.encoder.model.modules() if isinstance(m, nn.Linear)]
    assert encoder_layers and all(type(m) is PackedLinear for m in encoder_layers)
    assert generator.encoder.model.pooler is None  # mean pooling never read it
    assert type(generator.network.blocks[0].fc1) is PackedLinear
    enc = generator.encoder
    seqs = [enc.single("Answer with the antonym."), enc.pair("hot", "cold"), enc.chunks("a long instruction " * 60)[0]]
    packed = enc._forward(seqs)
    monkeypatch.setattr(PackedLinear, "_reordered", lambda self: None)  # every layer takes torch's plain path
    plain = enc._forward(seqs)
    torch.testing.assert_close(packed, plain, rtol=0, atol=1e-5)
