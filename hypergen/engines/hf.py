"""transformers + peft, for hosts without vLLM. Same API, one request at a time, no batching."""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, AsyncIterator, Callable

from transformers import StoppingCriteria

from hypergen.base_model import compute_dtype
from hypergen.engines.base import Engine, GenerationChunk, GenerationRequest
from hypergen.engines.peft_adapters import PeftAdapterSet


class TextStream(StoppingCriteria):
    """Called by ``generate`` after every token: emits the new text, applies stop strings and
    end-of-sequence, and stops generating for a client that went away."""

    def __init__(self, tokenizer: Any, stop: list[str], emit: Callable[[GenerationChunk], None], cancelled: threading.Event) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.emit = emit
        self.cancelled = cancelled
        self.tokens: list[int] = []
        self.text = ""
        self.reason = "length"

    def __call__(self, input_ids, scores, **kwargs) -> bool:  # noqa: ANN001 (transformers' signature)
        if self.cancelled.is_set():
            self.reason = "abort"
            return True
        token = int(input_ids[0, -1])
        if token == self.tokenizer.eos_token_id:
            self.reason = "stop"
            return True
        self.tokens.append(token)
        full = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        for stop in self.stop:
            if stop in full:
                full = full[: full.index(stop)]
                self.reason = "stop"
        if len(full) > len(self.text) and not full.endswith("\ufffd"):  # a whole character more
            self.emit(GenerationChunk(full[len(self.text) :]))
            self.text = full
        return self.reason == "stop"


class HFEngine(Engine):
    name = "hf"

    def __init__(self, model_path: str, dtype: str = "auto", max_cpu_loras: int = 64) -> None:
        self.model_path = model_path
        self.dtype = compute_dtype(dtype)
        self.max_cpu_loras = max_cpu_loras
        self._adapters: PeftAdapterSet | None = None
        self._tokenizer = None
        self._lock = threading.Lock()

    async def start(self) -> None:
        await asyncio.to_thread(self._load)

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=getattr(torch, self.dtype))
        if torch.cuda.is_available():  # this engine serves on the GPU where there is one, as vLLM does
            model = model.to("cuda")
        self._adapters = PeftAdapterSet(model.eval().requires_grad_(False), self.max_cpu_loras)

    async def shutdown(self) -> None:
        self._adapters = None

    def ready(self) -> bool:
        return self._adapters is not None

    def _run(self, request: GenerationRequest, emit: Callable[[GenerationChunk], None], queued_at: float, cancelled: threading.Event) -> None:
        import torch
        from transformers import StoppingCriteriaList

        with self._lock:
            if cancelled.is_set():  # left while queued
                return
            queue_ms = (time.perf_counter() - queued_at) * 1000
            adapter = request.adapter
            adapter_context = self._adapters.activate(adapter.name if adapter else None, adapter.path if adapter else None)
            ids = torch.tensor([request.prompt_token_ids], device=next(self._adapters.model.parameters()).device)
            stream = TextStream(self._tokenizer, request.stop, emit, cancelled)
            kwargs = {"max_new_tokens": request.max_tokens, "do_sample": not request.greedy}
            if not request.greedy:
                kwargs.update(temperature=request.temperature, top_p=request.top_p)
                if request.seed is not None:
                    torch.manual_seed(request.seed)
            with torch.inference_mode(), adapter_context:
                self._adapters.model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), stopping_criteria=StoppingCriteriaList([stream]),
                    pad_token_id=self._tokenizer.eos_token_id, **kwargs,
                )
            emit(GenerationChunk("", True, stream.reason, len(stream.tokens), queue_ms))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[GenerationChunk | BaseException] = asyncio.Queue()

        def emit(chunk: GenerationChunk) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, chunk)

        cancelled = threading.Event()

        def work() -> None:
            try:
                self._run(request, emit, time.perf_counter(), cancelled)
            except BaseException as exc:  # surfaced to the awaiting request
                loop.call_soon_threadsafe(queue.put_nowait, exc)

        loop.run_in_executor(None, work)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            cancelled.set()  # a no-op when it finished; stops the worker when the caller left

    async def remove_adapter(self, name: str) -> None:
        """Waits for a running generation off the event loop (the lock is held while one runs)."""

        def remove() -> None:
            with self._lock:
                self._adapters.remove(name)

        await asyncio.to_thread(remove)

    async def resident_adapters(self) -> int:
        return len(self._adapters) if self._adapters is not None else 0
