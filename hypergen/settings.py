"""The one configuration object of hypergen: library defaults and server settings alike.

Every field reads from an environment variable with the ``HYPERGEN_`` prefix
(``HYPERGEN_HOME``, ``HYPERGEN_REDIS_URL``...), so a deployment is configured
by its environment and nothing else.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_BASE_MODEL = "smollm2-135m-instruct"
DEFAULT_ENCODER = "all-minilm-l6-v2"
DEFAULT_CHECKPOINT = "default"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HYPERGEN_", extra="ignore")

    # --- library -----------------------------------------------------------
    home: Path = Field(
        default=Path("~/.cache/hypergen"),
        description="Where converted base models and other derived files are cached.",
    )
    base_model: str = Field(
        default=DEFAULT_BASE_MODEL,
        description="Built-in model name, local Hugging Face folder, or hub id.",
    )
    checkpoint: str = Field(
        default=DEFAULT_CHECKPOINT,
        description="Hypernetwork checkpoint folder, or 'default' for the one shipped in the package.",
    )
    device: str = Field(default="cpu", description="Torch device for the hypernetwork.")
    generator_dtype: Literal["auto", "float32", "bfloat16", "int8"] = Field(
        default="auto", description="What adapter generation computes in while serving (task encoder and hypernetwork; "
        "the shared LoRA stays float32): auto = bfloat16 where the hardware computes it natively, else int8 on a CPU "
        "with torch's x86 int8 kernels (the hypernetwork's output heads in int8, the rest float32), else float32. "
        "Adapters differ from float32 ones by rounding only.")
    adapter_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="What the server stores adapter tensors in (blobs, caches, PEFT folders, downloads): "
        "auto = bfloat16 for a vLLM engine in bf16 (it rounds every adapter to bf16 when it loads it, so nothing is lost "
        "and every copy is half the bytes), else float32. The adapter id does not change.")

    # --- server ------------------------------------------------------------
    generator_process: bool = Field(
        default=True, description="Generate adapters in a process of its own beside the server (faster on CPU than "
        "on the server's thread; server/generator_process.py). Off, or with a GPU device: in the server process.")
    generation_max_batch: int = Field(
        default=16, ge=1, le=64, description="Most cache misses generated in one batched pass: misses that arrive while "
        "one runs are generated together (about 0.6x the time per task at 16; server/miss_batches.py). 1 turns batching off.")
    host: str = "127.0.0.1"
    port: int = 8000
    engine: Literal["vllm", "hf"] = Field(
        default="vllm", description="Generation engine: vLLM multi-LoRA, or transformers+peft."
    )
    redis_url: str | None = Field(
        default=None, description="redis://host:port/db; unset means in-process cache only."
    )
    redis_prefix: str = "hypergen:"
    redis_ttl_s: int = Field(default=7 * 24 * 3600, ge=1)
    memory_cache_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    adapter_dir: Path | None = Field(
        default=None, description="Where PEFT folders for the engine go; default /dev/shm or $home."
    )
    dtype: str = Field(default="auto", description="Engine dtype: auto (bf16 on a GPU or a CPU that computes bf16 natively, else float32), bfloat16, float32.")
    max_adapter_dirs: int = Field(default=512, ge=1, description="PEFT folders kept in adapter_dir (oldest pruned).")
    max_loras: int = Field(default=8, ge=1, description="Adapters in one engine batch.")
    max_lora_rank: int | None = Field(
        default=None, ge=1,
        description="The engine's largest LoRA rank (vLLM: 8, 16, 32, 64...); unset: the hypernetwork's. "
        "Higher admits 'cat' compositions but costs every LoRA batch: the engine pads to it.")
    max_cpu_loras: int = Field(default=64, ge=1, description="Adapters kept loaded in the engine.")
    cpu_lora_ops: bool = Field(
        default=True, description="vLLM on CPU: hypergen's dense multi-LoRA matmuls instead of vLLM's per-token ops "
        "(hypergen/engines/cpu_lora.py). GPUs always use vLLM's kernels.")
    max_model_len: int = Field(default=2048, ge=128)
    gpu_memory_utilization: float = Field(
        default=0.5, gt=0, le=0.95,
        description="Share of the GPU vLLM may take (weights + KV cache). vLLM's own default (0.9) leaves no room "
        "for the hypernetwork beside it or for a second replica on the same GPU.")
    max_num_seqs: int | None = Field(default=None, ge=1, description="Sequences vLLM runs at once; unset: vLLM's default.")
    max_concurrent_requests: int = Field(default=64, ge=1)
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    max_prompt_tokens: int = Field(default=1536, ge=1)
    max_tokens_limit: int = Field(default=512, ge=1)
    kv_cache_gib: float = Field(default=2.0, gt=0)
    api_keys: list[str] = Field(
        default_factory=list,
        description="Bearer keys, each a tenant; a key may be given as 'sha256:<hex>' of itself. Empty = no auth, no tenants.")
    tenant_requests_per_minute: int | None = Field(default=None, ge=1, description="Per key; past it, 429. Unset: no limit.")
    tenant_max_adapters: int | None = Field(default=None, ge=1, description="Adapters one key may hold; past it, 429. Unset: no limit.")
    max_refine_jobs: int = Field(default=1, ge=1, description="Refine jobs training at once on this replica (one process each).")
    max_queued_jobs: int = Field(default=4, ge=0, description="Refine jobs waiting beyond those; past them, 503.")

    def resolved_home(self) -> Path:
        return self.home.expanduser()


def get_settings() -> Settings:
    """Fresh settings from the environment (cheap; callers that need one instance keep it)."""
    return Settings()
