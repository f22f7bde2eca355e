"""The engine interface: token ids and an optional adapter folder in, text deltas out."""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator


# Temperatures below this sample greedily (vLLM's own threshold): dividing logits by 1e-100 overflows.
GREEDY_BELOW = 1e-5


class EngineBusy(RuntimeError):
    """The engine cannot take another request now; the client should retry shortly."""


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter as an engine sees it: a stable name (the task hash) and its PEFT folder."""

    name: str
    path: Path


@dataclass
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    adapter: LoadedAdapter | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass
class GenerationChunk:
    """One step of output. The last chunk has ``finished`` set and the totals filled in."""

    text: str
    finished: bool = False
    finish_reason: str | None = None
    completion_tokens: int = 0
    queue_ms: float = 0.0


class Engine(abc.ABC):
    name: str

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def shutdown(self) -> None: ...

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]: ...

    @abc.abstractmethod
    async def remove_adapter(self, name: str) -> None: ...

    @abc.abstractmethod
    async def resident_adapters(self) -> int: ...

    @abc.abstractmethod
    def ready(self) -> bool: ...
