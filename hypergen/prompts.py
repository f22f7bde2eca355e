"""How a task instance becomes a chat prompt. Training and every evaluation method share it."""
from __future__ import annotations

import functools
from typing import Any, Sequence

from hypergen.task import Demo


def user_message(instruction: str, text: str, demos: Sequence[Demo] = ()) -> str:
    """Instruction, then (for in-context learning) worked examples, then the input."""
    parts = [instruction.strip()]
    if demos:
        shots = "\n\n".join(f"Input: {d.input}\nOutput: {d.output}" for d in demos)
        parts.append(f"Examples:\n\n{shots}")
    parts.append(f"Input: {text}\nOutput:")
    return "\n\n".join(p for p in parts if p)


INPUT_SLOT = "{input}"


def chat(instruction: str, text: str, demos: Sequence[Demo] = ()) -> list[dict[str, str]]:
    """The one-turn conversation the model answers: what a raw chat client would send."""
    return [{"role": "user", "content": user_message(instruction, text, demos)}]


def prompt_ids(tokenizer: Any, instruction: str, text: str, demos: Sequence[Demo] = ()) -> list[int]:
    ids = tokenizer.apply_chat_template(chat(instruction, text, demos), add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids)


@functools.lru_cache(maxsize=1024)
def prompt_template(tokenizer: Any, instruction: str) -> str:
    """The rendered prompt text with ``{input}`` where the input goes, for raw-completion clients.

    Sent as a completion prompt with the input substituted, it tokenises to ``prompt_ids``.
    Cached (tokenizers hash by identity): every adapter response carries it, and rendering the
    chat template took about a millisecond of the event loop's time per request.
    """
    return tokenizer.apply_chat_template(chat(instruction, INPUT_SLOT), add_generation_prompt=True, tokenize=False)


def target_ids(tokenizer: Any, output: str) -> list[int]:
    """The answer tokens the model is trained to produce, ending with the turn's end token."""
    end = tokenizer.eos_token_id
    return tokenizer(output.strip(), add_special_tokens=False)["input_ids"] + [end]


def first_line(text: str) -> str:
    """Answers are scored on their first non-empty line, as S-NI outputs are one line."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""
