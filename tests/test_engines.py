"""Generated adapters in both real engines: transformers+peft and the vLLM CPU build."""
import pytest
import torch

from hypergen.task import Demo, Task

pytestmark = pytest.mark.vllm

TASKS = [
    Task("Answer with the antonym of the word.", (Demo("hot", "cold"), Demo("up", "down"))),
    Task("Translate the sentence to French.", (Demo("I eat.", "Je mange."),)),
]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
N_TOKENS = 8


@pytest.fixture(scope="module")
def tokenizer(smollm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_dir)


@pytest.fixture(scope="module")
def prompt(tokenizer):
    return tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)


@pytest.fixture(scope="module")
def adapter_dirs(generator, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [a.save_peft(root / a.task_hash) for a in generator.generate_many(TASKS)]


def hf_greedy(smollm_dir, tokenizer, prompt, adapter_dir=None) -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=N_TOKENS, do_sample=False)
    return out[0, ids["input_ids"].shape[1] :].tolist()


def vllm_greedy(llm, prompts, loras) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=N_TOKENS, temperature=0.0)
    outs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def lora(i, path):
    from vllm.lora.request import LoRARequest

    return LoRARequest(f"adapter-{i}", i, str(path))


def test_adapter_changes_output_in_both_engines_and_they_agree(vllm_llm, smollm_dir, tokenizer, prompt, adapter_dirs):
    hf_base = hf_greedy(smollm_dir, tokenizer, prompt)
    hf_adapted = hf_greedy(smollm_dir, tokenizer, prompt, adapter_dirs[0])
    [vl_base] = vllm_greedy(vllm_llm, [prompt], None)
    [vl_adapted] = vllm_greedy(vllm_llm, [prompt], [lora(1, adapter_dirs[0])])
    assert hf_adapted != hf_base
    assert vl_adapted != vl_base
    assert vl_base[:4] == hf_base[:4]
    assert vl_adapted[:4] == hf_adapted[:4], (tokenizer.decode(vl_adapted), tokenizer.decode(hf_adapted))


def test_mixed_batch_equals_each_request_alone(vllm_llm, prompt, adapter_dirs):
    loras = [None, lora(1, adapter_dirs[0]), lora(2, adapter_dirs[1])]
    alone = [vllm_greedy(vllm_llm, [prompt], [l] if l else None)[0] for l in loras]
    batched = vllm_greedy(vllm_llm, [prompt] * 3, loras)
    assert alone[1] != alone[0] and alone[2] != alone[1]
    assert batched == alone


@pytest.mark.parametrize("cuda, avx512_bf16, amx, expected", [
    (False, False, False, "float32"),  # e.g. an AVX2-only EPYC: bf16 matmuls ~100x slower than float32
    (False, True, False, "bfloat16"),
    (False, False, True, "bfloat16"),
    (True, False, False, "bfloat16"),
])
def test_auto_dtype_is_bf16_only_where_the_hardware_computes_it(monkeypatch, cuda, avx512_bf16, amx, expected):
    import torch

    from hypergen.base_model import compute_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert compute_dtype("auto") == expected
    assert compute_dtype("float32") == "float32" and compute_dtype("bfloat16") == "bfloat16"  # explicit wins


def test_vllm_in_bf16_loads_a_bf16_adapter_exactly_as_the_float32_one(generator, bf16_storing_generator, tmp_path):
    """Why bf16 blobs lose nothing on a bf16 vLLM engine: its loader rounds every adapter to the
    engine's LoRA dtype (the model's), so both folders become the same tensors."""
    pytest.importorskip("vllm")
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    exact, stored = generator.generate(TASKS[0]), bf16_storing_generator.generate(TASKS[0])
    loaded = []
    for adapter in (exact, stored):
        folder = str(adapter.save_peft(tmp_path / str(adapter.tensors[next(iter(adapter.tensors))].dtype)))
        loaded.append(LoRAModel.from_local_checkpoint(
            folder, {"q_proj", "v_proj"}, PEFTHelper.from_local_dir(folder, None), lora_model_id=1, device="cpu",
            dtype=torch.bfloat16,
        ).loras)
    assert loaded[0].keys() == loaded[1].keys() and len(loaded[0]) == 60
    for name, lora in loaded[0].items():
        assert lora.lora_a.dtype == torch.bfloat16
        assert torch.equal(lora.lora_a, loaded[1][name].lora_a) and torch.equal(lora.lora_b, loaded[1][name].lora_b)


def test_engine_rank_is_one_every_supported_vllm_accepts():
    from hypergen.engines.vllm import engine_rank

    assert [engine_rank(r) for r in (1, 8, 9, 16, 300, 512)] == [8, 8, 16, 16, 320, 512]
    with pytest.raises(ValueError, match="above"):
        engine_rank(513)
