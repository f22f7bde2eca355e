"""Generation engines behind one small interface, for the server and for evaluation alike.

``create_engine`` is the one place an engine is built from settings; ``OfflineEngine``
drives one from synchronous code (``hypergen eval``, scripts, tests).
"""
from __future__ import annotations

from hypergen.engines.base import Engine, EngineBusy, GenerationChunk, GenerationRequest, LoadedAdapter
from hypergen.engines.offline import OfflineEngine
from hypergen.settings import Settings

__all__ = [
    "Engine", "EngineBusy", "GenerationChunk", "GenerationRequest", "LoadedAdapter", "OfflineEngine",
    "adapter_dtype", "create_engine", "installed_engine",
]


def installed_engine() -> str:
    """'vllm' when vLLM is installed, else 'hf' (transformers + peft)."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "hf"
    return "vllm"


def adapter_dtype(settings: Settings) -> str:
    """What adapter tensors are stored in for the engine ``settings`` name (``HYPERGEN_ADAPTER_DTYPE``).

    ``auto``: bfloat16 where the engine keeps LoRA weights in bf16 anyway: vLLM casts a loaded
    adapter to its own dtype, so for vLLM in bf16 a float32 adapter's low bits never reach a
    token, and a bf16 one is half the bytes at every step of a miss (blob, transfer from the
    generator process, Redis, memory tier, folder). transformers + peft upcasts adapters to
    float32 and computes LoRA there, so it keeps float32, as does everything in float32, and
    vLLM on a GPU with ``auto`` (it takes the model's own dtype there, which may be float16).
    """
    if settings.adapter_dtype != "auto":
        return settings.adapter_dtype
    from hypergen.engines.vllm import vllm_dtype

    return "bfloat16" if settings.engine == "vllm" and vllm_dtype(settings.dtype) == "bfloat16" else "float32"


def create_engine(settings: Settings, model_path: str, max_lora_rank: int) -> Engine:
    """The engine ``settings.engine`` names, sized by the settings (HYPERGEN_MAX_LORAS...)."""
    if settings.engine == "vllm":
        from hypergen.engines.vllm import VLLMEngine

        return VLLMEngine(
            model_path, max_lora_rank, max_loras=settings.max_loras, max_cpu_loras=settings.max_cpu_loras,
            max_model_len=settings.max_model_len, dtype=settings.dtype, kv_cache_gib=settings.kv_cache_gib,
            gpu_memory_utilization=settings.gpu_memory_utilization, max_num_seqs=settings.max_num_seqs,
            cpu_lora_ops=settings.cpu_lora_ops,
        )
    if settings.engine == "hf":
        from hypergen.engines.hf import HFEngine

        return HFEngine(model_path, dtype=settings.dtype, max_cpu_loras=settings.max_cpu_loras)
    raise ValueError(f"unknown engine {settings.engine!r}; use 'vllm' or 'hf'")
