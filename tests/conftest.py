"""Shared fixtures: real base models (the built-in SmolLM2 and a tiny random Llama), the real
MiniLM encoder, and one vLLM CPU engine for the whole session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hypergen.base_model import ensure_converted  # noqa: E402
from hypergen.generator import HyperGenerator  # noqa: E402
from hypergen.hypernet import HyperNetwork  # noqa: E402

BASE = "smollm2-135m-instruct"
REQUIRE_REAL_PARTS = "HYPERGEN_REQUIRE_REAL_PARTS"  # set by .ci/run: a skip there is a failure


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # noqa: ANN001 (pytest hook)
    """Under CI every test runs on the real parts; one that skips (vLLM missing, say) fails the run."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get(REQUIRE_REAL_PARTS) and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped, but {REQUIRE_REAL_PARTS} is set (CI): {report.longrepr}"


def randomize_heads(network: HyperNetwork, seed: int = 0, std: float = 0.03, bias_std: float = 0.2) -> HyperNetwork:
    """Gives an untrained network non-zero output heads, so its adapters visibly change the model.

    A stand-in for a trained checkpoint where a test needs adapters that differ per task. The
    scales were picked by hand on SmolLM2: strong enough to change a confident greedy answer
    ("The capital of France is Paris."), weak enough that the output stays fluent text.
    """
    gen = torch.Generator().manual_seed(seed)
    cfg = network.config
    # The scales are of the emitted correction (the heads' outputs are multiplied by a_scale, b_scale):
    # A moves by std per unit of hidden state, B by std * 0.02 with a bias of bias_std * 0.02.
    with torch.no_grad():
        for head in network.a_heads.values():
            head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * std / cfg.a_scale)
        for head in network.b_heads.values():
            head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * std * 0.02 / cfg.b_scale)
            head.bias.copy_(torch.randn(head.bias.shape, generator=gen) * bias_std * 0.02 / cfg.b_scale)
    return network


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    return ensure_converted(BASE)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, smollm_dir: Path) -> Path:
    """A 2-layer random Llama with head_dim 64 (vLLM's CPU attention needs 64) and grouped KV heads."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def generator(smollm_dir: Path) -> HyperGenerator:
    """The default spec on SmolLM2, with randomised heads so adapters are non-zero."""
    gen = HyperGenerator.untrained(BASE)
    randomize_heads(gen.network)
    gen.fingerprint = gen.network.fingerprint()
    return gen


@pytest.fixture(scope="session")
def bf16_storing_generator(generator: HyperGenerator) -> HyperGenerator:
    """The same network and encoder, storing adapters in bf16 (HYPERGEN_ADAPTER_DTYPE=bfloat16)."""
    return HyperGenerator(generator.network, generator.encoder, generator.fingerprint, generator.base_model,
                          generator.checkpoint, adapter_dtype="bfloat16")


@pytest.fixture(scope="module")
def vllm_llm(smollm_dir: Path):
    """One offline vLLM engine (CPU build) with LoRA enabled, shared by every test that needs it.

    float32, because in bf16 the composition of a batch moves logprobs by up to ~0.2 nats
    (measured: base + two LoRAs batched vs alone), which flips greedy choices at near-ties.
    In float32 a mixed batch is token-identical to each request alone.
    """
    vllm = pytest.importorskip("vllm")
    llm = vllm.LLM(
        model=str(smollm_dir),
        enable_lora=True,
        max_loras=4,
        max_lora_rank=8,
        max_cpu_loras=8,
        enforce_eager=True,
        max_model_len=1024,
        dtype="float32",
        seed=0,
    )
    yield llm
    del llm


# --- servers ---------------------------------------------------------------------

import uuid  # noqa: E402

from launcher import RedisProcess, ServerProcess  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session")
def checkpoint_dir(generator, tmp_path_factory) -> Path:
    """The randomised test hypernetwork as a checkpoint folder, for servers to load."""
    out = tmp_path_factory.mktemp("checkpoint")
    generator.network.save(out)
    return out


@pytest.fixture(scope="session")
def redis_prefix() -> str:
    """A fresh key prefix per test session, so runs never see each other's adapters."""
    return f"hypergen-test-{uuid.uuid4().hex[:8]}:"


@pytest.fixture(scope="session")
def redis_client(redis_prefix):
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    client.ping()
    yield client
    for key in client.scan_iter(f"{redis_prefix}*"):
        client.delete(key)


@pytest.fixture(scope="session")
def server_env(checkpoint_dir, redis_prefix, redis_client) -> dict[str, str]:
    return {"HYPERGEN_CHECKPOINT": str(checkpoint_dir), "HYPERGEN_REDIS_URL": REDIS_URL, "HYPERGEN_REDIS_PREFIX": redis_prefix}


@pytest.fixture(scope="session")
def vllm_server(server_env, tmp_path_factory):
    """The real server on the vLLM CPU engine, started once per session.

    float32, as the library's engine tests: vLLM's CPU bf16 kernels answer differently from host
    to host (seen: on a host with AMX, "What is the capital of France?" gets "L'Étoile, la
    Marseillaise," from vLLM in bf16, and "The capital of France is Paris." from vLLM in
    float32 and from transformers in bf16 and float32), so the tests' answers would too.
    """
    pytest.importorskip("vllm")
    env = {**server_env, "HYPERGEN_ENGINE": "vllm", "HYPERGEN_DTYPE": "float32", "HYPERGEN_MAX_QUEUED_JOBS": "1"}
    server = ServerProcess(tmp_path_factory.mktemp("srv"), env, "vllm").wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def hf_replica(server_env, tmp_path_factory):
    """A second replica (transformers engine) sharing the first one's Redis and prefix."""
    server = ServerProcess(tmp_path_factory.mktemp("srv"), {**server_env, "HYPERGEN_ENGINE": "hf"}, "hf").wait_ready()
    yield server
    server.stop()


@pytest.fixture()
def own_redis(tmp_path):
    redis = RedisProcess(tmp_path).start()
    yield redis
    redis.stop()
