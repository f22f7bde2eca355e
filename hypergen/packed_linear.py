"""Linear layers whose float32 weights are laid out once for oneDNN, for generating on a CPU.

Why: generating one task's adapter runs about 50 small matmuls (a few dozen rows each), and at
that size ``torch.nn.functional.linear`` reached 40-45 GFLOP/s of the ~95 two AVX2 cores sustain
(MKL repacks the weight on every call, and the encoder's 42 MB of weights leave the cache between
tasks). oneDNN's ``_linear_pointwise`` reads a weight reordered once (``_reorder_linear_weight``),
as ``torch.compile`` does with frozen weights on a CPU: 74 GFLOP/s on the same matmuls. On an AVX2-only EPYC the encoder's
pass for one task took 0.80-0.83x the time (README, Benchmarks), with embeddings equal to
rounding (cosine 0.9999999), and without ``torch.compile``'s minute of compiling per shape.

Only where it is safe and measured: float32 on a CPU, no gradients wanted (training falls back
to the plain layer, so gradients flow as ever), and a weight that has not changed since it was
reordered (its version counter is checked each call, so an in-place edit is seen). bf16 keeps
torch's own path: oneDNN's bf16 reorder needs AVX512 and was not measured on such a host.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def packing_available() -> bool:
    """Whether this torch build has oneDNN and its reordered-weight linear (private, as used by
    torch's own inductor; a build without them keeps the plain layers)."""
    return bool(
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` sharing the original's parameters (so state dicts, fingerprints and
    in-place edits are unchanged) that computes through a reordered copy of its weight."""

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self._packed: tuple[tuple[int, int], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)) or not (
            x.dtype == w.dtype == torch.float32 and x.device.type == w.device.type == "cpu"
        ):
            return F.linear(x, w, self.bias)
        packed = self._reordered()
        if packed is None:
            return F.linear(x, w, self.bias)
        flat = x.reshape(-1, self.in_features)
        out = torch.ops.mkldnn._linear_pointwise(flat, packed, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)

    def __getstate__(self) -> dict:
        """Copies (``copy.deepcopy``) leave the reordered weight behind: it is an opaque oneDNN
        tensor that cannot be copied, and the copy reorders its own weight on first use."""
        return {**super().__getstate__(), "_packed": None}

    def _reordered(self) -> torch.Tensor | None:
        """The reordered weight, made again whenever the weight changed (None: a weight made under
        ``inference_mode`` has no version counter, so a change could not be seen)."""
        try:
            key = (self.weight.data_ptr(), self.weight._version)
        except RuntimeError:
            return None
        if self._packed is None or self._packed[0] != key:
            with torch.no_grad():
                self._packed = (key, torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None))
        return self._packed[1]


def pack_linears(module: nn.Module) -> nn.Module:
    """Swaps every plain ``nn.Linear`` inside ``module`` for a ``PackedLinear`` on the same
    parameters (subclasses, such as attention's output projection or quantised layers, are
    left alone); a no-op where ``packing_available`` is false."""
    if not packing_available():
        return module
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PackedLinear(child))
    return module
