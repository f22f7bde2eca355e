"""One greedy chat answer per engine and dtype, to see whether a host's kernels change answers.

    .venv/bin/python bench/engine_dtypes.py            # vLLM bf16 and float32, transformers bf16 and float32
"""
from __future__ import annotations

import argparse

from hypergen.base_model import load_tokenizer, resolve_base_model
from hypergen.engines import OfflineEngine, create_engine
from hypergen.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--question", default="What is the capital of France?")
    parser.add_argument("--max-tokens", type=int, default=12)
    args = parser.parse_args()
    name = "smollm2-135m-instruct"
    tokenizer = load_tokenizer(name)
    chat = [{"role": "user", "content": args.question}]
    ids = list(tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False))
    for engine in ("vllm", "hf"):
        for dtype in ("bfloat16", "float32"):
            settings = Settings(engine=engine, dtype=dtype, max_model_len=1024, kv_cache_gib=1)
            offline = OfflineEngine(create_engine(settings, resolve_base_model(name), 8))
            print(f"{engine:5} {dtype:9} {offline.greedy([(ids, None)], args.max_tokens)[0]!r}", flush=True)
            offline.close()


if __name__ == "__main__":
    main()
