import dataclasses
import hashlib
import math

import pytest
import torch

from hypergen.adapter import Adapter, peft_key, tensor_distance, to_blobs
from hypergen.errors import CheckpointError, CorruptAdapterError, HypergenError
from hypergen.generator import HyperGenerator, generation_dtype
from hypergen.hypernet import FORMAT_VERSION, HyperNetConfig, int8_available
from hypergen.packed_linear import PackedLinear
from hypergen.task import Demo, Task

TASK = Task("Answer with the antonym of the word.", (Demo("hot", "cold"), Demo("up", "down"), Demo("big", "small")))
OTHER = Task("Translate the word to French.", (Demo("cat", "chat"), Demo("dog", "chien")))


def test_untrained_network_is_a_noop_with_peft_style_a(smollm_dir):
    gen = HyperGenerator.untrained("smollm2-135m-instruct")
    adapter = gen.generate(TASK)
    a, b = adapter.layer_weights(0, "q_proj")
    assert a.shape == (8, 576) and b.shape == (576, 8)
    assert torch.count_nonzero(b) == 0
    assert a.abs().max() <= 1 / math.sqrt(576) and a.std() > 0
    assert not gen.trained and gen.info()["trained"] is False


def test_adapter_has_peft_keys_for_every_layer_and_module(generator):
    adapter = generator.generate(TASK)
    assert len(adapter.tensors) == 30 * 2 * 2
    assert peft_key(29, "v_proj", "B") == "base_model.model.model.layers.29.self_attn.v_proj.lora_B.weight"
    assert adapter.tensors[peft_key(29, "v_proj", "B")].shape == (192, 8)
    assert peft_key(3, "down_proj", "A").endswith("layers.3.mlp.down_proj.lora_A.weight")


def test_same_task_same_hash_and_identical_bytes(generator):
    first, second = generator.generate(TASK), generator.generate(TASK)
    assert first.task_hash == second.task_hash == generator.task_hash(TASK)
    assert first.to_bytes() == second.to_bytes()
    assert generator.generate(OTHER).task_hash != first.task_hash


def test_batched_generation_matches_single(generator):
    batched = generator.generate_many([OTHER, TASK])
    single = generator.generate(TASK)
    assert batched[1].task_hash == single.task_hash
    for key, tensor in single.tensors.items():
        # float32 sums in another order (the encoder packs a batch's texts into shared rows): rounding-level
        # differences, far below the ~1e-2 entries a task mix-up would move
        torch.testing.assert_close(batched[1].tensors[key], tensor, rtol=1e-4, atol=1e-5)
    assert not torch.equal(batched[0].tensors[peft_key(0, "q_proj", "B")], single.tensors[peft_key(0, "q_proj", "B")])


def test_demo_count_varies_from_zero_to_32(generator):
    zero = generator.generate(Task("Reverse the letters of the word."))
    many = generator.generate(Task("Reverse the letters of the word.", tuple(Demo(f"w{i}", f"{i}w") for i in range(32))))
    only_demos = generator.generate(Task("", (Demo("abc", "cba"),)))
    keys = peft_key(5, "q_proj", "B")
    assert not torch.equal(zero.tensors[keys], many.tensors[keys])
    assert torch.isfinite(only_demos.tensors[keys]).all()


def test_bytes_round_trip_and_corruption_is_detected(generator):
    adapter = generator.generate(TASK)
    blob = adapter.to_bytes()
    back = Adapter.from_bytes(blob)
    assert back.task_hash == adapter.task_hash and back.rank == 8 and back.target_modules == ["q_proj", "v_proj"]
    for key, tensor in adapter.tensors.items():
        assert torch.equal(back.tensors[key], tensor)
    damaged = bytearray(blob)
    damaged[-100] ^= 0xFF
    with pytest.raises(CorruptAdapterError):
        Adapter.from_bytes(bytes(damaged))
    with pytest.raises(CorruptAdapterError):
        Adapter.from_bytes(blob[: len(blob) // 2])
    with pytest.raises(CorruptAdapterError):
        Adapter.from_bytes(b"not an adapter at all")
    # The checksum covers the metadata too: a damaged alpha or task hash is as bad as a weight.
    for before, after in (b'lora_alpha\\":16.0', b'lora_alpha\\":64.0'), (adapter.task_hash[:8].encode(), b"deadbeef"):
        assert before in blob
        with pytest.raises(CorruptAdapterError):
            Adapter.from_bytes(blob.replace(before, after, 1))


def test_blobs_of_a_batch_are_each_adapters_own_bytes_in_order(generator):
    adapters = generator.generate_many([Task(f"Say {w}.", (Demo("x", w),)) for w in ("one", "two", "three", "four")])
    made = to_blobs(adapters)
    assert [blob for blob, _ in made] == [a.to_bytes() for a in adapters]
    assert len({blob for blob, _ in made}) == 4 and all(ms > 0 for _, ms in made)
    assert [Adapter.from_bytes(blob).task_hash for blob, _ in made] == [a.task_hash for a in adapters]


def test_blob_is_a_safetensors_file_the_library_reads(generator):
    import json
    import struct

    from safetensors.torch import load

    adapter = generator.generate(TASK)
    adapter.tensors[peft_key(0, "q_proj", "A")] = adapter.tensors[peft_key(0, "q_proj", "A")].bfloat16()  # mixed dtypes
    blob = adapter.to_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    assert n % 8 == 0  # tensor bytes start 8-aligned, as the format asks
    header = json.loads(blob[8 : 8 + n])
    assert header["__metadata__"]["format"] == "pt" and json.loads(header["__metadata__"]["hypergen"])["sha256"]
    assert max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__") == len(blob) - 8 - n
    read = load(blob)  # safetensors' own reader
    assert read.keys() == adapter.tensors.keys() and read[peft_key(0, "q_proj", "A")].dtype == torch.bfloat16
    assert all(torch.equal(read[k], v) for k, v in adapter.tensors.items())
    assert Adapter.from_bytes(blob).task_hash == adapter.task_hash


def test_bf16_generation_keeps_the_shared_lora_exact_and_the_adapter_close(generator, tmp_path):
    generator.network.save(tmp_path / "ckpt", dtype=torch.float32)
    exact = HyperGenerator.from_pretrained(tmp_path / "ckpt")
    fast = HyperGenerator.from_pretrained(tmp_path / "ckpt", dtype="bfloat16")
    assert exact.compute_dtype == "float32" and fast.compute_dtype == "bfloat16"
    assert next(fast.encoder.model.parameters()).dtype == torch.bfloat16  # the encoder too
    assert fast.fingerprint == exact.fingerprint and fast.task_hash(TASK) == exact.task_hash(TASK)
    shared = exact.network.shared()
    assert all(fast.network.shared()[m][i].dtype == torch.float32 and torch.equal(fast.network.shared()[m][i], shared[m][i])
               for m in shared for i in (0, 1))
    a, b = exact.generate(TASK), fast.generate(TASK)
    assert b.tensors[peft_key(0, "q_proj", "B")].dtype == torch.float32  # emitted as float32 whatever the compute
    for key, tensor in a.tensors.items():
        assert (b.tensors[key] - tensor).norm() <= 0.01 * tensor.norm() + 1e-6, key


@pytest.mark.skipif(not int8_available(), reason="this torch has no x86 int8 kernels")
def test_int8_generation_quantizes_only_the_heads_and_keeps_the_adapter_close(generator, tmp_path):
    generator.network.save(tmp_path / "ckpt", dtype=torch.float32)  # entry heads, not centred
    exact = HyperGenerator.from_pretrained(tmp_path / "ckpt")
    fast = HyperGenerator.from_pretrained(tmp_path / "ckpt", dtype="int8")
    assert fast.compute_dtype == "int8" and fast.info()["hypernetwork_dtype"] == "int8"
    heads = [head for group in fast.network.output_heads() for head in group.values()]
    assert heads and all(type(head) is not torch.nn.Linear for head in heads)  # swapped for int8 ones
    assert type(fast.network.mix) in (torch.nn.Linear, PackedLinear) and fast.network.mix.weight.dtype == torch.float32  # trunk as is
    assert next(fast.encoder.model.parameters()).dtype == torch.float32
    assert fast.fingerprint == exact.fingerprint and fast.task_hash(TASK) == exact.task_hash(TASK)
    shared = exact.shared_adapter().tensors
    a, b = exact.generate(TASK), fast.generate(TASK)
    assert fast.generate(TASK).to_bytes() == b.to_bytes()  # deterministic: one task, one blob
    correction, error = tensor_distance(a.tensors, shared), tensor_distance(b.tensors, a.tensors)
    assert 0 < error <= 0.05 * correction  # rounded, not exact, far below what the task changes (random heads: 2.1%; the trained entry-head checkpoint: 0.12%)
    assert all(torch.equal(fast.shared_adapter().tensors[k], shared[k]) for k in shared)  # shared LoRA untouched


@pytest.mark.parametrize("dtype", ["bfloat16", *(["int8"] if int8_available() else [])])
def test_a_centred_network_keeps_float32_whatever_the_generation_dtype(smollm_dir, dtype):
    exact = HyperGenerator.from_pretrained("default")  # the shipped checkpoint: centred, basis heads
    fast = HyperGenerator.from_pretrained("default", dtype=dtype)
    assert exact.network.needs_float32 and fast.info()["hypernetwork_dtype"] == "float32"
    assert all(p.dtype == torch.float32 for p in fast.network.parameters())
    assert all(type(head) in (torch.nn.Linear, PackedLinear) for group in fast.network.output_heads() for head in group.values())  # not int8
    assert fast.info()["encoder_dtype"] == ("bfloat16" if dtype == "bfloat16" else "float32")  # the encoder may round
    shared = exact.shared_adapter().tensors
    a, b = exact.generate(TASK), fast.generate(TASK)
    correction, error = tensor_distance(a.tensors, shared), tensor_distance(b.tensors, a.tensors)
    assert correction > 0 and error <= 0.02 * correction  # in bf16 throughout it was 92% (needs_float32)


@pytest.mark.parametrize("native_bf16, int8, device, expected", [
    (True, True, "cpu", "bfloat16"),
    (False, True, "cpu", "int8"),     # e.g. an AVX2-only EPYC
    (False, False, "cpu", "float32"),
    (False, True, "cuda", "float32"),
])
def test_auto_generation_dtype_follows_the_hardware(monkeypatch, native_bf16, int8, device, expected):
    import hypergen.generator as generator_module

    monkeypatch.setattr(generator_module, "compute_dtype", lambda requested: "bfloat16" if native_bf16 else "float32")
    monkeypatch.setattr(generator_module, "int8_available", lambda: int8)
    assert generation_dtype("auto", device) == expected
    assert generation_dtype("float32", device) == "float32"  # explicit wins
    if device == "cuda":
        with pytest.raises(HypergenError) as err:
            generation_dtype("int8", device)
        assert err.value.field == "generator_dtype"


def test_adapters_stored_in_bf16_are_the_float32_ones_rounded_once_in_half_the_bytes(generator, bf16_storing_generator):
    """HYPERGEN_ADAPTER_DTYPE=bfloat16 (a vLLM engine in bf16): computed as before, rounded once when
    the tensors are made, as the engine's own loader would round a float32 adapter."""
    exact, stored = generator.generate(TASK), bf16_storing_generator.generate(TASK)
    assert stored.task_hash == exact.task_hash and stored.tensors.keys() == exact.tensors.keys()
    for key, tensor in exact.tensors.items():
        assert stored.tensors[key].dtype == torch.bfloat16
        assert torch.equal(stored.tensors[key], tensor.to(torch.bfloat16))
    blob = stored.to_bytes()
    assert len(blob) < 0.55 * len(exact.to_bytes())
    assert Adapter.from_bytes(blob).tensors[peft_key(0, "q_proj", "A")].dtype == torch.bfloat16
    with pytest.raises(HypergenError) as err:
        HyperGenerator(generator.network, generator.encoder, generator.fingerprint, generator.base_model, "x", adapter_dtype="bf16")
    assert err.value.field == "adapter_dtype"


@pytest.mark.parametrize("engine, dtype, cuda, requested, expected", [
    ("vllm", "auto", False, "auto", "bfloat16"),   # this host's vLLM: it rounds adapters to bf16 itself
    ("vllm", "float32", False, "auto", "float32"),
    ("hf", "auto", False, "auto", "float32"),      # PEFT upcasts adapters and computes LoRA in float32
    ("vllm", "auto", True, "auto", "float32"),     # a GPU takes the model's own dtype, maybe float16
    ("vllm", "bfloat16", True, "auto", "bfloat16"),
    ("hf", "auto", False, "bfloat16", "bfloat16"),  # explicit wins
    ("vllm", "auto", False, "float32", "float32"),
])
def test_the_stored_adapter_dtype_follows_what_the_engine_keeps(monkeypatch, engine, dtype, cuda, requested, expected):
    import hypergen.engines.vllm as vllm_engine
    from hypergen.engines import adapter_dtype
    from hypergen.settings import Settings

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(vllm_engine, "compute_dtype", lambda d: "bfloat16" if d == "auto" else d)  # a host with native bf16
    assert adapter_dtype(Settings(engine=engine, dtype=dtype, adapter_dtype=requested)) == expected


def test_save_peft_loads_in_peft_with_identical_tensors(generator, smollm_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = generator.generate(TASK)
    adapter.save_peft(tmp_path / "ad")
    base = AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, tmp_path / "ad")
    state = model.state_dict()
    for key, tensor in adapter.tensors.items():
        peft_name = key.replace(".weight", ".default.weight")
        assert torch.equal(state[peft_name], tensor), key
    assert Adapter.load_peft(tmp_path / "ad").tensors.keys() == adapter.tensors.keys()


def test_checkpoint_round_trip_keeps_fingerprint_and_outputs(generator, tmp_path):
    generator.network.save(tmp_path / "ckpt", dtype=torch.float32)
    loaded = HyperGenerator.from_pretrained(tmp_path / "ckpt")
    assert loaded.fingerprint == generator.fingerprint  # same weights and config, same identity
    assert loaded.generate(TASK).to_bytes() == loaded.generate(TASK).to_bytes()
    original, again = generator.generate(TASK), loaded.generate(TASK)
    assert again.task_hash == original.task_hash
    # equal up to float rounding: the two encoders embedded the task's texts in batches of other shapes
    for key, tensor in original.tensors.items():
        torch.testing.assert_close(again.tensors[key], tensor, rtol=1e-4, atol=1e-5, msg=key)


def test_checkpoint_for_other_dims_fails_clearly(generator, tiny_llama_dir, tmp_path):
    generator.network.save(tmp_path / "ckpt")
    with pytest.raises(CheckpointError) as err:
        HyperGenerator.from_pretrained(tmp_path / "ckpt", base_model=str(tiny_llama_dir))
    assert err.value.field == "base_model"
    assert "num_layers: checkpoint 30 vs model 2" in err.value.message


def test_unknown_checkpoint_format_is_refused(generator, tmp_path):
    generator.network.save(tmp_path / "ckpt")
    cfg = (tmp_path / "ckpt" / "config.json").read_text().replace(f'"format_version": {FORMAT_VERSION}', '"format_version": 99')
    (tmp_path / "ckpt" / "config.json").write_text(cfg)
    with pytest.raises(CheckpointError, match="format version 99"):
        HyperGenerator.from_pretrained(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="not a hypernetwork checkpoint"):
        HyperGenerator.from_pretrained(tmp_path / "missing")


def test_generator_for_a_tiny_llama(tiny_llama_dir):
    gen = HyperGenerator.untrained(str(tiny_llama_dir), spec_overrides={"target_modules": ("q_proj", "k_proj", "up_proj"), "rank": 16})
    adapter = gen.generate(TASK)
    assert adapter.tensors[peft_key(1, "k_proj", "B")].shape == (64, 16)
    assert adapter.tensors[peft_key(1, "up_proj", "B")].shape == (256, 16)
    assert HyperNetConfig.from_dict(gen.network.config.to_dict()).spec() == gen.spec


def test_embeddings_of_repeated_texts_are_reused_and_the_cache_is_bounded(generator, monkeypatch):
    from hypergen import encoder as encoder_module

    enc = generator.encoder
    calls = []
    forward = enc._forward
    monkeypatch.setattr(enc, "_forward", lambda seqs: calls.append(len(seqs)) or forward(seqs))
    task = Task("Reverse the word (cache test).", (Demo("abc", "cba"), Demo("dog", "god")))
    first = generator.generate(task)
    encoded = sum(calls)
    assert encoded > 0
    again = generator.generate(Task("Reverse the word (cache test, new instruction).", task.demos))
    assert sum(calls) == encoded + 1  # only the new instruction went through the encoder
    assert again.tensors.keys() == first.tensors.keys()
    assert torch.equal(generator.generate(task).tensors[peft_key(0, "q_proj", "B")], first.tensors[peft_key(0, "q_proj", "B")])
    monkeypatch.setattr(enc, "_cache_size", 3)
    enc.embed([f"text {i}" for i in range(10)])
    assert len(enc._cache) <= 3
    assert encoder_module.CACHE_SIZE >= 1024


def test_warm_up_runs_every_stage_and_changes_no_adapter(generator, monkeypatch):
    before = generator.generate(TASK).to_bytes()
    calls = []
    forward = generator.network.forward
    monkeypatch.setattr(generator.network, "forward", lambda *args: calls.append(args[0].shape) or forward(*args))
    generator.warm_up()
    assert len(calls) == 3 and len({shape[1] for shape in calls}) == 3  # 0, 3 and 8 demos: three item counts
    assert generator.generate(TASK).to_bytes() == before


def test_a_checkpoint_trained_on_fewer_encoder_layers_is_served_with_as_many(smollm_dir, tmp_path):
    """encoder_layers: the network records how many of the encoder's layers it was trained on,
    and loading it cuts the encoder the same way; the whole encoder keeps the old fingerprint."""
    from hypergen.encoder import TaskEncoder
    from hypergen.hypernet import HyperNetwork, _config_digest
    from hypergen.task import canonical_json

    gen = HyperGenerator.untrained("smollm2-135m-instruct", encoder_layers=3)
    assert len(gen.encoder.model.encoder.layer) == 3 and gen.info()["encoder_layers"] == 3
    whole = TaskEncoder(gen.network.config.encoder)
    assert len(whole.model.encoder.layer) == 6
    texts = ["Answer with the antonym.", "hot -> cold"]
    assert float((gen.encoder.embed(texts) * whole.embed(texts)).sum(-1).min()) < 0.999  # other vectors
    gen.network.save(tmp_path)
    loaded = HyperGenerator.from_pretrained(str(tmp_path))
    assert len(loaded.encoder.model.encoder.layer) == 3
    assert torch.allclose(loaded.encoder.embed(texts), gen.encoder.embed(texts), atol=1e-5)
    config = dataclasses.replace(gen.network.config, encoder_layers=0)
    older = {k: v for k, v in config.to_dict().items() if k not in ("training", "encoder_layers")}  # as saved before the key
    assert _config_digest(config) == hashlib.sha256(canonical_json(older).encode()).digest()
    assert _config_digest(config) != _config_digest(gen.network.config)
    with pytest.raises(HypergenError) as err:
        TaskEncoder(gen.network.config.encoder, layers=7)
    assert err.value.field == "encoder_layers"
    assert isinstance(loaded.network, HyperNetwork)
