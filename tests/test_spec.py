import pytest

from hypergen.base_model import load_dims, resolve_base_model
from hypergen.errors import HypergenError, SpecError
from hypergen.spec import LoraSpec


def test_smollm2_spec_shapes(smollm_dir):
    dims = load_dims("smollm2-135m-instruct")
    assert (dims.num_layers, dims.hidden_size, dims.num_heads, dims.num_kv_heads, dims.head_dim) == (30, 576, 9, 3, 64)
    spec = LoraSpec(dims, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    assert spec.a_shape("q_proj") == (8, 576) and spec.b_shape("q_proj") == (576, 8)
    assert spec.b_shape("k_proj") == (192, 8)  # 3 KV heads x 64
    assert spec.b_shape("v_proj") == (192, 8)
    assert spec.a_shape("o_proj") == (8, 576)
    assert spec.b_shape("gate_proj") == (1536, 8) and spec.a_shape("down_proj") == (8, 1536)
    default = LoraSpec(dims)
    assert default.target_modules == ("q_proj", "v_proj") and default.scaling == 2.0
    assert default.num_adapter_params() == 30 * 8 * ((576 + 576) + (576 + 192))


def test_tiny_llama_spec_shapes(tiny_llama_dir):
    dims = load_dims(str(tiny_llama_dir))
    spec = LoraSpec(dims, target_modules=("q_proj", "v_proj", "down_proj"), rank=16)
    assert dims.num_layers == 2 and dims.head_dim == 64
    assert spec.b_shape("q_proj") == (128, 16)
    assert spec.b_shape("v_proj") == (64, 16)  # one KV head
    assert spec.a_shape("down_proj") == (16, 256)


def test_unknown_module_and_unservable_rank_are_named(smollm_dir):
    dims = load_dims("smollm2-135m-instruct")
    with pytest.raises(SpecError) as err:
        LoraSpec(dims, target_modules=("q_proj", "qkv_proj"))
    assert err.value.field == "target_modules" and "qkv_proj" in err.value.message
    with pytest.raises(SpecError) as err:
        LoraSpec(dims, rank=12)
    assert err.value.field == "rank" and "320" in err.value.message
    assert LoraSpec(dims, rank=320).rank == 320


def test_missing_local_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(HypergenError) as err:
        resolve_base_model(str(tmp_path / "nope"))
    assert err.value.field == "base_model"
    with pytest.raises(HypergenError, match="config.json"):
        resolve_base_model(str(tmp_path))
