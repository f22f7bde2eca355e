"""Synthetic tasks for benchmarks: distinct instructions and correct demos, no data files needed."""
from __future__ import annotations

import random

from hypergen.task import Demo, Task

WORDS = "apple river stone cloud quick seven violet engine window garden silver paper orbit lemon tiger".split()
RULES = {
    "Reverse the letters of the given word": lambda w: w[::-1],
    "Write the given word in capital letters": str.upper,
    "Give the first letter of the given word": lambda w: w[0],
    "Count the letters of the given word": lambda w: str(len(w)),
    "Sort the letters of the given word alphabetically": lambda w: "".join(sorted(w)),
}


def synthetic_task(i: int, n_demos: int = 3) -> tuple[Task, str]:
    """Task number i (distinct instruction per i) and one fresh input word for it."""
    rng = random.Random(i)
    instruction, rule = list(RULES.items())[i % len(RULES)]
    words = rng.sample(WORDS, n_demos + 1)
    demos = tuple(Demo(w, rule(w)) for w in words[:n_demos])
    return Task(f"{instruction} (variant {i}).", demos), words[-1]
