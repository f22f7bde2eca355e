"""Generation engines behind one small interface, so routes never know which one runs."""
from server.engines.base import Engine, EngineBusy, GenerationChunk, GenerationRequest, LoadedAdapter

__all__ = ["Engine", "EngineBusy", "GenerationChunk", "GenerationRequest", "LoadedAdapter", "create_engine"]


def create_engine(kind: str, **kwargs) -> Engine:
    if kind == "vllm":
        from server.engines.vllm import VLLMEngine

        return VLLMEngine(**kwargs)
    if kind == "hf":
        from server.engines.hf import HFEngine

        return HFEngine(**kwargs)
    raise ValueError(f"unknown engine {kind!r}; use 'vllm' or 'hf'")
