"""vLLM's AsyncLLM in the server process, multi-LoRA: requests with different adapters share batches."""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator

from hypergen.base_model import compute_dtype
from hypergen.engines import cpu_lora
from hypergen.engines.base import Engine, EngineBusy, GenerationChunk, GenerationRequest

log = logging.getLogger(__name__)


# max_lora_rank values every supported vLLM accepts (0.11 refuses 1; 0.32 takes it too).
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def engine_rank(rank: int) -> int:
    """The smallest rank vLLM accepts that holds ``rank`` (smaller adapters are padded by vLLM)."""
    for allowed in VLLM_RANKS:
        if rank <= allowed:
            return allowed
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest ({VLLM_RANKS[-1]})")


def vllm_dtype(requested: str = "auto") -> str:
    """The dtype vLLM is started with: on a CPU ``compute_dtype``'s choice; on a GPU as asked
    (``auto`` there is vLLM's own: the model's dtype, which may be float16)."""
    import torch

    return compute_dtype(requested) if not torch.cuda.is_available() else requested


@dataclass(eq=False)
class VLLMEngine(Engine):
    model_path: str
    max_lora_rank: int
    max_loras: int = 8
    max_cpu_loras: int = 64
    max_model_len: int = 2048
    dtype: str = "auto"
    kv_cache_gib: float = 2.0
    gpu_memory_utilization: float = 0.5
    max_num_seqs: int | None = None
    cpu_lora_ops: bool = True
    name = "vllm"
    _engine: Any = field(default=None, init=False)
    _ids: dict[str, int] = field(default_factory=dict, init=False)  # adapter name -> vLLM lora_int_id, stable for this process
    _next_id: Iterator[int] = field(default_factory=lambda: itertools.count(1), init=False)
    _revival: asyncio.Future | None = field(default=None, init=False)  # at most one revival runs at a time

    async def start(self) -> None:
        import torch
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        on_cpu = not torch.cuda.is_available()
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(self.kv_cache_gib))))
            # read by hypergen's vLLM plugin in the engine processes, which inherit this environment
            os.environ[cpu_lora.ENV] = "1" if self.cpu_lora_ops else "0"
        # vLLM starts its engine core by fork on CUDA; this process has threads and torch state by
        # now, and a forked child inherits them half-made. The CPU build already spawns.
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        sizing = {} if self.max_num_seqs is None else {"max_num_seqs": self.max_num_seqs}
        args = AsyncEngineArgs(
            model=self.model_path,
            enable_lora=True,
            max_loras=self.max_loras,
            max_lora_rank=engine_rank(self.max_lora_rank),
            max_cpu_loras=max(self.max_cpu_loras, self.max_loras),
            max_model_len=self.max_model_len,
            dtype=vllm_dtype(self.dtype),
            enforce_eager=on_cpu,
            disable_log_stats=False,  # also fills per-request timestamps (queue_ms)
            gpu_memory_utilization=self.gpu_memory_utilization,  # ignored on CPU (VLLM_CPU_KVCACHE_SPACE sizes it)
            **sizing,
        )
        self._engine = AsyncLLM.from_engine_args(args)

    async def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None

    def ready(self) -> bool:
        return self._engine is not None and not self._engine.errored

    def _start_revival(self) -> None:
        if self._revival is None or self._revival.done():
            self._revival = asyncio.ensure_future(self._revive())

    async def _revive(self) -> None:
        """vLLM's engine core died (a crash in the worker, a killed process) and does not come back
        by itself: start a new one. Adapters are loaded again as requests name them."""
        if self._engine is not None and not self._engine.errored:
            return  # an earlier revival already brought it back
        log.error("the vLLM engine died; starting a new one")
        dead, self._engine = self._engine, None
        if dead is not None:
            try:
                dead.shutdown()
            except Exception:  # noqa: BLE001 (it is dead already)
                log.exception("shutting the dead engine down")
        self._ids.clear()
        await self.start()

    async def _lora(self, request: GenerationRequest):
        from vllm.lora.request import LoRARequest

        if request.adapter is None:
            return None
        name = request.adapter.name
        if name not in self._ids:
            if len(self._ids) >= 4 * self.max_cpu_loras:
                await self._forget_evicted()
            self._ids[name] = next(self._next_id)
        return LoRARequest(name, self._ids[name], str(request.adapter.path))

    async def _forget_evicted(self) -> None:
        """Drops the names of adapters vLLM has evicted, so the map stays bounded (ids are never reused)."""
        resident = set(await self._engine.list_loras())
        self._ids = {name: lora_id for name, lora_id in self._ids.items() if lora_id in resident}

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.exceptions import EngineDeadError

        params = SamplingParams(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            stop=request.stop or None,
            seed=request.seed,
            output_kind=RequestOutputKind.DELTA,
        )
        prompt = {"prompt_token_ids": request.prompt_token_ids}
        completion_tokens = 0
        finished = False
        if self._engine is None or self._engine.errored:
            self._start_revival()
            raise EngineBusy("the engine stopped and is restarting; retry shortly")
        try:
            lora = await self._lora(request)
            async for out in self._engine.generate(prompt, params, request.request_id, lora_request=lora):
                piece = out.outputs[0]
                completion_tokens += len(piece.token_ids)
                if out.finished:
                    finished = True
                    stats = out.metrics
                    queue_ms = 0.0
                    if stats is not None and stats.scheduled_ts and stats.queued_ts:
                        queue_ms = max(0.0, (stats.scheduled_ts - stats.queued_ts) * 1000)
                    yield GenerationChunk(
                        piece.text, True, piece.finish_reason, completion_tokens, queue_ms
                    )
                    return
                yield GenerationChunk(piece.text)
        except EngineDeadError:
            finished = True  # nothing to abort in a dead engine
            self._start_revival()
            raise EngineBusy("the engine stopped and is restarting; retry shortly") from None
        finally:
            if not finished and self._engine is not None:  # the client went away mid-stream: free the engine's slot
                await self._engine.abort(request.request_id)

    async def remove_adapter(self, name: str) -> None:
        lora_id = self._ids.pop(name, None)
        if lora_id is not None and self._engine is not None:
            await self._engine.remove_lora(lora_id)

    async def resident_adapters(self) -> int:
        if self._engine is None:
            return 0
        return len(await self._engine.list_loras())
