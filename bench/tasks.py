"""Synthetic tasks for benchmarks: distinct instructions and correct demos, no data files needed."""
from __future__ import annotations

import random

from hypergen.task import Demo, Task

SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
RULES = {
    "Reverse the letters of the given word": lambda w: w[::-1],
    "Write the given word in capital letters": str.upper,
    "Give the first letter of the given word": lambda w: w[0],
    "Count the letters of the given word": lambda w: str(len(w)),
    "Sort the letters of the given word alphabetically": lambda w: "".join(sorted(w)),
}


def synthetic_task(i: int, n_demos: int = 3) -> tuple[Task, str]:
    """Task number i and one fresh input word for it. Its words are made up from i, so no text
    repeats across tasks: a miss encodes every text, as a new client's task does (the embedding
    cache would otherwise serve the demos of earlier tasks)."""
    rng = random.Random(i)
    instruction, rule = list(RULES.items())[i % len(RULES)]
    words = ["".join(rng.choices(SYLLABLES, k=rng.randint(2, 4))) for _ in range(n_demos + 1)]
    demos = tuple(Demo(w, rule(w)) for w in words[:n_demos])
    return Task(f"{instruction} (variant {i}).", demos), words[-1]
