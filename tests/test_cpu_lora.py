"""hypergen's grouped CPU LoRA ops (a vLLM plugin) against vLLM's own CPU ops, and in a real engine."""
import pytest
import torch

from hypergen.task import Demo, Task

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm")

IN, OUT_SLICES = 64, (64, 16, 16)  # a merged q/k/v layer's three output slices


def wrappers(indices: list[int], prefill: bool, slots: int):
    """vLLM's CPU punica wrapper and hypergen's, given the same per-token adapter slots (-1: none)."""
    from vllm.lora.layers.utils import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from hypergen.engines.cpu_lora import GroupedPunicaWrapperCPU

    ids = [None] * slots  # slot -> vLLM lora id (slot + 1)
    for i in set(indices) - {-1}:
        ids[i] = i + 1
    mapping = LoRAMapping([i + 1 if i >= 0 else 0 for i in indices], [i + 1 if i >= 0 else 0 for i in indices], prefill)
    out = []
    for cls in (PunicaWrapperCPU, GroupedPunicaWrapperCPU):
        wrapper = cls(256, 64, "cpu")
        wrapper.update_metadata(mapping, ids, slots, 1000)
        out.append(wrapper)
    return out


def stacked(slots: int, rank: int, seed: int, empty_last: bool):
    gen = torch.Generator().manual_seed(seed)
    a = tuple(torch.randn(slots, 1, rank, IN, generator=gen) for _ in OUT_SLICES)
    b = tuple(torch.randn(slots, 1, out, rank, generator=gen) for out in OUT_SLICES)
    if empty_last:  # vLLM's reference ops read slot -1 (the last) for rows without an adapter
        for t in (*a, *b):
            t[-1].zero_()
    return a, b


@pytest.mark.parametrize("rank", [1, 8, 16])
@pytest.mark.parametrize("slots", [4, 16])
@pytest.mark.parametrize("prefill, tokens", [(False, 7), (True, 90)])
def test_grouped_ops_equal_vllm_reference_ops(rank, slots, prefill, tokens):
    gen = torch.Generator().manual_seed(rank * 100 + slots)
    used = slots - 1  # the last slot stays empty, so the reference is right for base rows too
    if prefill:  # sequences of consecutive tokens, each with one adapter or none
        lengths = [tokens // 5] * 4 + [tokens - 4 * (tokens // 5)]
        per_seq = [-1, 0, used - 1, 0, -1]
        indices = [s for s, n in zip(per_seq, lengths) for _ in range(n)]
    else:
        indices = torch.randint(-1, used, (tokens,), generator=gen).tolist()
        indices[:2] = [-1, used - 1]
    x = torch.randn(tokens, IN, generator=gen)
    a, b = stacked(slots, rank, seed=rank + slots, empty_last=True)
    reference, grouped = wrappers(indices, prefill, slots)
    y0 = torch.randn(tokens, sum(OUT_SLICES), generator=gen)
    outputs = []
    for wrapper in (reference, grouped):
        y = y0.clone()
        wrapper.add_lora_linear(y, x, a, b, 0.5, OUT_SLICES)
        outputs.append(y)
    assert not torch.equal(outputs[0], y0)  # the LoRA did something
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-4)
    base_rows = torch.tensor(indices) == -1
    assert torch.equal(outputs[1][base_rows], y0[base_rows])


@pytest.mark.parametrize("prefill", [False, True])
def test_q_and_v_adapters_run_fused_and_equal_vllm_reference_ops(prefill):
    """Adapters for q and v only (k's slots zero, as vLLM leaves them): one fused pass per layer."""
    from hypergen.engines.cpu_lora import fused_slices

    indices = [0, 0, 0, 2, 2, -1, 1, 1] if prefill else [2, -1, 0, 1, 2, 0]
    x = torch.randn(len(indices), IN)
    a, b = stacked(4, 8, seed=9, empty_last=True)
    a[1].zero_(), b[1].zero_()  # no adapter targets k
    fused = fused_slices(a, b, OUT_SLICES)
    assert fused is not None and fused.start == 0
    assert fused.a_t.shape == (4, IN, 16) and fused.b_t.shape == (4, 16, sum(OUT_SLICES))  # q and v; k's columns zero
    ys = []
    for wrapper in wrappers(indices, prefill, 4):
        y = torch.randn(len(indices), sum(OUT_SLICES), generator=torch.Generator().manual_seed(1))
        wrapper.add_lora_linear(y, x, a, b, 0.5, OUT_SLICES)
        ys.append(y)
    torch.testing.assert_close(ys[1], ys[0], rtol=1e-4, atol=1e-4)
    b[2][0].add_(1.0)  # an adapter loaded in place: the fused weights follow
    assert fused_slices(a, b, OUT_SLICES) is not fused
    only_q = (a[0], torch.zeros_like(a[1]), torch.zeros_like(a[2]))
    assert fused_slices(only_q, b, OUT_SLICES) is None  # one live slice: the plain path


@pytest.mark.parametrize("prefill", [False, True])
def test_rows_without_an_adapter_get_none_even_when_the_last_slot_is_full(prefill):
    """vLLM's CPU reference gathers weights[-1] (the last slot) for index -1 (vLLM PR #48421)."""
    indices = [3, 3, -1, -1, 0]
    x = torch.randn(5, IN)
    a, b = stacked(4, 8, seed=1, empty_last=False)
    _, grouped = wrappers(indices, prefill, 4)
    y = torch.zeros(5, sum(OUT_SLICES))
    grouped.add_lora_linear(y, x, a, b, 1.0, OUT_SLICES)
    assert y[2:4].abs().sum() == 0
    assert y[:2].abs().sum() > 0 and y[4].abs().sum() > 0


def test_tokens_are_grouped_by_slot_and_padding_stays_bounded():
    from hypergen.engines.cpu_lora import MAX_PADDING, group_tokens

    # decode: one token per sequence, two slots of sixteen in use, one base row
    [batch] = group_tokens(torch.tensor([5, 11, 5, -1]))
    assert batch.slots.tolist() == [5, 11] and batch.width == 2
    assert batch.rows.tolist() == [0, 2, 1] and batch.keep.tolist() == [True, True, True, False]
    # prefill: an 80-token prompt beside two 3-token ones is two batches, not 3 x 80 rows
    indices = torch.tensor([0] * 80 + [1] * 3 + [-1] * 5 + [2] * 3)
    batches = group_tokens(indices)
    assert [b.slots.tolist() for b in batches] == [[0], [1, 2]]
    for b in batches:
        assert b.padded.numel() <= MAX_PADDING * b.rows.numel()
        assert torch.equal(indices[b.rows], b.slots.repeat_interleave((b.keep.view(len(b.slots), -1)).sum(1)))
    assert sorted(torch.cat([b.rows for b in batches]).tolist()) == [i for i in range(len(indices)) if indices[i] >= 0]
    assert group_tokens(torch.tensor([-1, -1])) == []


@pytest.mark.parametrize("lengths", [[80, 3, 3], [1] * 9, [40, 30, 2]])
def test_uneven_groups_equal_vllm_reference_ops(lengths):
    indices = [g for g, n in enumerate(lengths) for _ in range(n)]
    x = torch.randn(len(indices), IN)
    a, b = stacked(len(lengths) + 1, 8, seed=3, empty_last=True)
    reference, grouped = wrappers(indices, True, len(lengths) + 1)
    ys = [torch.zeros(len(indices), sum(OUT_SLICES)) for _ in range(2)]
    reference.add_lora_linear(ys[0], x, a, b, 1.0, OUT_SLICES)
    grouped.add_lora_linear(ys[1], x, a, b, 1.0, OUT_SLICES)
    torch.testing.assert_close(ys[1], ys[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prefill", [False, True])
def test_separate_shrink_and_expand_equal_vllm_reference(prefill):
    """The two-step API (shrink into a [T, r] buffer, then expand) that vLLM's sharded layers call."""
    indices = [0, 0, 0, 2, 2, -1, 1] if prefill else [2, -1, 0, 1, 2]
    x = torch.randn(len(indices), IN)
    a, b = stacked(4, 8, seed=6, empty_last=True)
    outputs = []
    for wrapper in wrappers(indices, prefill, 4):
        buffers = torch.zeros(len(OUT_SLICES), len(indices), 8)
        wrapper.add_shrink(buffers, x, a, 0.5)
        y = torch.ones(len(indices), sum(OUT_SLICES))
        wrapper.add_expand(y, buffers, b, OUT_SLICES, offset_start=0, add_inputs=True)
        outputs.append(y)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-4)


def test_zero_slots_are_skipped_until_an_adapter_is_loaded_into_them():
    """vLLM zeroes the slots of modules an adapter does not target; a load writes in place."""
    from hypergen.engines.cpu_lora import live_slots

    a, b = stacked(4, 8, seed=4, empty_last=True)
    a[0][1].zero_()
    assert live_slots(a[0]) == {0, 2}
    a[0][1, 0, 0, 0] = 1.0  # an in-place load into slot 1
    assert live_slots(a[0]) == {0, 1, 2}
    indices = [1, 1, 0, -1]
    x = torch.randn(4, IN)
    reference, grouped = wrappers(indices, False, 4)
    ys = [torch.zeros(4, sum(OUT_SLICES)) for _ in range(2)]
    reference.add_lora_linear(ys[0], x, a, b, 1.0, OUT_SLICES)
    grouped.add_lora_linear(ys[1], x, a, b, 1.0, OUT_SLICES)
    torch.testing.assert_close(ys[1], ys[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prefill", [False, True])
def test_logits_lora_equals_vllm_reference(prefill):
    vocab, slots = 500, 4
    indices = [0, 0, 2, 2, 2] if prefill else [0, 2, 1]
    reference, grouped = wrappers(indices, prefill, slots)
    rows = reference.sampler_indices.shape[0]
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(slots, 1, 8, IN, generator=gen)
    b = torch.randn(slots, 1, vocab, 8, generator=gen)
    a[-1].zero_()
    b[-1].zero_()
    x = torch.randn(rows, IN, generator=gen)
    ys = [torch.zeros(rows, vocab) for _ in range(2)]
    reference.add_lora_logits(ys[0], x, a, b, 0.5)
    grouped.add_lora_logits(ys[1], x, a, b, 0.5)
    assert ys[0].abs().sum() > 0
    torch.testing.assert_close(ys[1], ys[0], rtol=1e-4, atol=1e-3)


def test_plugin_is_on_by_default_and_off_by_the_setting(monkeypatch):
    from vllm.platforms import current_platform

    from hypergen.engines import cpu_lora

    vllms_own = "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"
    monkeypatch.setattr(type(current_platform), "get_punica_wrapper", classmethod(lambda cls: vllms_own))
    monkeypatch.setenv(cpu_lora.ENV, "0")
    cpu_lora.register()
    assert current_platform.get_punica_wrapper() == vllms_own
    monkeypatch.delenv(cpu_lora.ENV)
    cpu_lora.register()
    assert current_platform.get_punica_wrapper() == cpu_lora.WRAPPER


# --- in a real engine (float32: batch composition does not move logits there) ---------------

TASKS = [Task(f"Answer in the style number {i}.", (Demo("hot", f"cold {i}"),)) for i in range(4)]
N_TOKENS = 8


@pytest.fixture(scope="module")
def four_adapters(generator, tmp_path_factory):
    root = tmp_path_factory.mktemp("cpu-lora-adapters")
    return [a.save_peft(root / a.task_hash) for a in generator.generate_many(TASKS)]


def greedy(llm, prompts, loras):
    params = vllm.SamplingParams(max_tokens=N_TOKENS, temperature=0.0)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, lora_request=loras, use_tqdm=False)]


def lora(i, path):
    from vllm.lora.request import LoRARequest

    return LoRARequest(f"adapter-{i}", i + 1, str(path))


def test_greedy_text_is_the_same_with_and_without_the_plugin(vllm_llm, smollm_dir, four_adapters, monkeypatch):
    """A mixed batch (base + three adapters), once through the grouped ops (the shared engine,
    plugin on by default) and once through vLLM's own (a second engine with the setting off)."""
    prompts = ["What is the capital of France?", "Name a colour.", "Count to three.", "Say hello."]
    loras = [None, *(lora(i, p) for i, p in enumerate(four_adapters[:3]))]
    with_plugin = greedy(vllm_llm, prompts, loras)
    monkeypatch.setenv("HYPERGEN_CPU_LORA_OPS", "0")
    plain = vllm.LLM(model=str(smollm_dir), enable_lora=True, max_loras=4, max_lora_rank=8, max_cpu_loras=8,
                     enforce_eager=True, max_model_len=1024, dtype="float32", seed=0)
    try:
        without = greedy(plain, prompts, loras)
    finally:
        del plain
    assert with_plugin == without
    assert len({tuple(t) for t in with_plugin}) == 4


def test_a_base_request_stays_base_beside_a_full_set_of_adapters(vllm_llm, four_adapters):
    """Every slot of the engine (max_loras=4) holds an adapter that changes this answer; the base
    request batched with them answers as it does alone."""
    prompt = "What is the capital of France?"
    [alone] = greedy(vllm_llm, [prompt], None)
    loras = [None, *(lora(10 + i, p) for i, p in enumerate(four_adapters))]
    batched = greedy(vllm_llm, [prompt] * 5, loras)
    assert all(row != alone for row in batched[1:]), batched  # each adapter changes this answer
    assert batched[0] == alone
