"""A task (instruction + demonstrations), its input limits, and its content hash.

The task hash is the identity of an adapter everywhere: cache keys, adapter ids,
engine LoRA names. It is the SHA-256 of this canonical JSON (keys sorted, no
whitespace, UTF-8, ``ensure_ascii=False``)::

    {"demos": [[input, output], ...],          # in the order given
     "hypernetwork": <checkpoint fingerprint>, # hex SHA-256 of config + weights
     "instruction": <instruction, runs of whitespace -> one space, stripped>,
     "spec": <LoraSpec.to_dict()>,
     "v": 1}

Demo text is hashed exactly as sent: whitespace can be meaningful in outputs.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from hypergen.errors import TaskError

HASH_VERSION = 1
TASK_HASH_PATTERN = r"^[0-9a-f]{64}$"  # what a task hash (an adapter id) looks like

# Input limits, rejected outright so no demo is ever silently dropped. Everything within
# them reaches the hypernetwork: long instructions are read in several encoder windows, and
# a long demo input is shortened from its middle so its output is always read (task_items.py).
MAX_INSTRUCTION_CHARS = 8000
MAX_DEMO_FIELD_CHARS = 4000
MAX_DEMOS = 32

_WS = re.compile(r"\s+")


def normalize_instruction(text: str) -> str:
    return _WS.sub(" ", text).strip()


@dataclass(frozen=True)
class Demo:
    input: str
    output: str


@dataclass(frozen=True)
class Task:
    """What a client describes; validated on construction so a bad task never reaches the model."""

    instruction: str
    demos: tuple[Demo, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not isinstance(self.instruction, str):
            raise TaskError("must be a string", "instruction")
        object.__setattr__(self, "demos", tuple(self.demos))
        if len(self.instruction) > MAX_INSTRUCTION_CHARS:
            raise TaskError(
                f"is {len(self.instruction)} characters; the limit is {MAX_INSTRUCTION_CHARS}",
                "instruction",
            )
        if len(self.demos) > MAX_DEMOS:
            raise TaskError(f"has {len(self.demos)} demos; the limit is {MAX_DEMOS}", "demos")
        for i, demo in enumerate(self.demos):
            for name in ("input", "output"):
                value = getattr(demo, name)
                where = f"demos.{i}.{name}"
                if not isinstance(value, str):
                    raise TaskError("must be a string", where)
                if len(value) > MAX_DEMO_FIELD_CHARS:
                    raise TaskError(
                        f"is {len(value)} characters; the limit is {MAX_DEMO_FIELD_CHARS}", where
                    )
            if not demo.output.strip():
                raise TaskError("is empty; every demo needs an output", f"demos.{i}.output")
        if not self.normalized_instruction and not self.demos:
            raise TaskError("is empty and there are no demos; give one or both", "instruction")

    @property
    def normalized_instruction(self) -> str:
        return normalize_instruction(self.instruction)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Task":
        """Builds a task from JSON-like data (``{"instruction", "demos": [{"input", "output"}]}``)."""
        if not isinstance(data, dict):
            raise TaskError("must be an object with 'instruction' and 'demos'", "task")
        demos = data.get("demos") or []
        if not isinstance(demos, list):
            raise TaskError("must be a list of {input, output} objects", "demos")
        return cls(instruction=data.get("instruction", ""), demos=tuple(_demo(d, i) for i, d in enumerate(demos)))

    def to_dict(self) -> dict[str, Any]:
        return {"instruction": self.instruction, "demos": [{"input": d.input, "output": d.output} for d in self.demos]}



def _demo(raw: Any, i: int) -> Demo:
    if not isinstance(raw, dict):
        raise TaskError("must be an object with 'input' and 'output'", f"demos.{i}")
    for name in ("input", "output"):
        if name not in raw:
            raise TaskError("is missing", f"demos.{i}.{name}")
    return Demo(input=raw["input"], output=raw["output"])


def read_demos_jsonl(lines: Iterable[str], source: str = "demos") -> list[Demo]:
    """Parses ``{"input": ..., "output": ...}`` lines; blank lines are skipped."""
    demos: list[Demo] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskError(f"line {n} is not JSON ({exc.msg})", source) from None
        demos.append(_demo(raw, len(demos)))
    return demos


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def task_hash(task: Task, hypernetwork_fingerprint: str, spec: dict[str, Any]) -> str:
    """Hex SHA-256 identity of the adapter this task yields under one checkpoint and spec."""
    payload = {
        "v": HASH_VERSION,
        "instruction": task.normalized_instruction,
        "demos": [[d.input, d.output] for d in task.demos],
        "hypernetwork": hypernetwork_fingerprint,
        "spec": spec,
    }
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()
