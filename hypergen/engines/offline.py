"""An engine driven from synchronous code: evaluation, scripts and tests use the serving engines.

It owns one event loop for its whole life (vLLM's async engine is bound to the loop it
started in) and sends each batch in at once, so the engine batches it as it would
concurrent requests to the server.
"""
from __future__ import annotations

import asyncio
import hashlib
import uuid
from pathlib import Path
from typing import Sequence

from hypergen.engines.base import Engine, GenerationRequest, LoadedAdapter


class OfflineEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(engine.start())

    @property
    def name(self) -> str:
        return self.engine.name

    def greedy(self, requests: Sequence[tuple[list[int], str | Path | None]], max_tokens: int) -> list[str]:
        """Greedy answers to (prompt ids, PEFT folder or None) pairs; one folder, one adapter name."""
        return self.run([
            GenerationRequest(uuid.uuid4().hex, list(ids), max_tokens, adapter=None if folder is None else adapter_at(folder))
            for ids, folder in requests
        ])

    def run(self, requests: Sequence[GenerationRequest]) -> list[str]:
        """Every request's full text, in order. If one fails, the others are cancelled and it raises."""
        async def one(request: GenerationRequest) -> str:
            return "".join([chunk.text async for chunk in self.engine.generate(request)])

        async def every() -> list[str]:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one(r)) for r in requests]
            return [t.result() for t in tasks]

        try:
            return self._loop.run_until_complete(every())
        except BaseExceptionGroup as group:  # the first failure, as a caller of one request would see it
            raise group.exceptions[0] from None

    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.run_until_complete(self.engine.shutdown())
            self._loop.close()


def adapter_at(folder: str | Path) -> LoadedAdapter:
    """A PEFT folder as an engine adapter, named by a hash of its path (PEFT names cannot hold dots)."""
    return LoadedAdapter(hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:32], Path(folder))
