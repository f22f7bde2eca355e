"""The LoRA spec: which modules of which base model get adapters, at what rank and shape.

Derived from the base model's config alone, so a spec (and a checkpoint that holds
one) can be checked against a model without loading its weights.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any

from hypergen.errors import SpecError

# Llama-style projections, the names PEFT and vLLM use for them, and the block each sits in.
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LLAMA_MODULES = ATTENTION_MODULES + MLP_MODULES
# Ranks vLLM's LoRA kernels accept (max_lora_rank must be one of these).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_TARGET_MODULES = ("q_proj", "v_proj")
DEFAULT_RANK = 8
DEFAULT_ALPHA = 16.0


def module_block(module: str) -> str:
    """The attribute of a decoder layer that holds ``module``: 'self_attn' or 'mlp'."""
    return "mlp" if module in MLP_MODULES else "self_attn"


@dataclass(frozen=True)
class ModelDims:
    """The shape facts of a decoder that a LoRA depends on."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def from_config(cls, config: Any) -> "ModelDims":
        """Reads a transformers config (object or dict)."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        heads = get("num_attention_heads")
        hidden = get("hidden_size")
        return cls(
            model_type=str(get("model_type", "llama")),
            num_layers=int(get("num_hidden_layers")),
            hidden_size=int(hidden),
            num_heads=int(heads),
            num_kv_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or hidden // heads),
            intermediate_size=int(get("intermediate_size")),
            vocab_size=int(get("vocab_size")),
        )

    def fingerprint(self) -> str:
        from hypergen.task import canonical_json

        return hashlib.sha256(canonical_json(asdict(self)).encode()).hexdigest()[:16]

    def module_shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of one projection; k/v are grouped-query sized."""
        q_out = self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        shapes = {
            "q_proj": (self.hidden_size, q_out),
            "k_proj": (self.hidden_size, kv_out),
            "v_proj": (self.hidden_size, kv_out),
            "o_proj": (q_out, self.hidden_size),
            "gate_proj": (self.hidden_size, self.intermediate_size),
            "up_proj": (self.hidden_size, self.intermediate_size),
            "down_proj": (self.intermediate_size, self.hidden_size),
        }
        if module not in shapes:
            raise SpecError(f"unknown module {module!r}; choose from {', '.join(LLAMA_MODULES)}", "target_modules")
        return shapes[module]


@dataclass(frozen=True)
class LoraSpec:
    """Target modules, rank and alpha for one base model; shapes come from ``dims``."""

    dims: ModelDims
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    rank: int = DEFAULT_RANK
    alpha: float = DEFAULT_ALPHA

    def __post_init__(self) -> None:
        mods = tuple(self.target_modules)
        object.__setattr__(self, "target_modules", mods)
        if not mods:
            raise SpecError("needs at least one module", "target_modules")
        unknown = [m for m in mods if m not in LLAMA_MODULES]
        if unknown:
            raise SpecError(
                f"unknown module(s) {', '.join(map(repr, unknown))}; choose from {', '.join(LLAMA_MODULES)}",
                "target_modules",
            )
        if len(set(mods)) != len(mods):
            raise SpecError("lists a module twice", "target_modules")
        if self.rank not in VLLM_RANKS:
            raise SpecError(
                f"rank {self.rank} cannot be served by vLLM; use one of {', '.join(map(str, VLLM_RANKS))}",
                "rank",
            )
        if not self.alpha > 0:
            raise SpecError("must be positive", "alpha")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def num_layers(self) -> int:
        return self.dims.num_layers

    def shape(self, module: str) -> tuple[int, int]:
        return self.dims.module_shape(module)

    def a_shape(self, module: str) -> tuple[int, int]:
        return (self.rank, self.shape(module)[0])

    def b_shape(self, module: str) -> tuple[int, int]:
        return (self.shape(module)[1], self.rank)

    def num_adapter_params(self) -> int:
        per_layer = sum(self.rank * (i + o) for i, o in map(self.shape, self.target_modules))
        return per_layer * self.num_layers

    def to_dict(self) -> dict[str, Any]:
        return {
            "target_modules": list(self.target_modules),
            "rank": self.rank,
            "alpha": self.alpha,
            "base_dims": self.dims.fingerprint(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], dims: ModelDims) -> "LoraSpec":
        spec = cls(dims=dims, target_modules=tuple(data["target_modules"]), rank=int(data["rank"]), alpha=float(data["alpha"]))
        if data.get("base_dims") not in (None, dims.fingerprint()):
            raise SpecError("was made for a base model of other dimensions", "base_model")
        return spec
