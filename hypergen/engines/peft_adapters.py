"""One base model with named PEFT adapters loaded on demand: the transformers way to serve many LoRAs.

Used by the transformers engine (serving and evaluation). Not thread-safe:
callers serialise access (one request at a time).
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from torch import nn


class PeftAdapterSet:
    def __init__(self, model: nn.Module, max_loaded: int = 64) -> None:
        self.model = model
        self.max_loaded = max_loaded
        self._loaded: list[str] = []  # least recently used first

    def __len__(self) -> int:
        return len(self._loaded)

    def activate(self, name: str | None, path: str | Path | None = None) -> AbstractContextManager:
        """Makes ``name`` (loading it from ``path`` if new) the active adapter; None means the base model.

        Returns a context to run the forward pass in (it disables adapters for a base request).
        """
        from peft import PeftModel

        if name is None:
            return self.model.disable_adapter() if isinstance(self.model, PeftModel) else nullcontext()
        if not isinstance(self.model, PeftModel):
            self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name).eval()
            self._loaded.append(name)
        elif name not in self._loaded:
            if len(self._loaded) >= self.max_loaded:
                self.model.delete_adapter(self._loaded.pop(0))  # the least recently used
            self.model.load_adapter(path, adapter_name=name)
            self._loaded.append(name)
        else:  # most recently used last
            self._loaded.remove(name)
            self._loaded.append(name)
        self.model.set_adapter(name)
        return nullcontext()

    def remove(self, name: str) -> None:
        if name not in self._loaded:
            return
        self._loaded.remove(name)
        if self._loaded:
            self.model.delete_adapter(name)
        else:  # peft cannot delete its last adapter: unwrap back to the plain base model
            self.model = self.model.unload()
