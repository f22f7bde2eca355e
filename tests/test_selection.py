"""Demo pools (hypergen.selection, HyperGenerator.generate_for): which demos each input gets."""
from __future__ import annotations

import pytest

from hypergen.errors import TaskError
from hypergen.selection import MAX_POOL, Selection, check_pool
from hypergen.task import Demo

POOL = [
    Demo("The film was a delight from start to finish.", "positive"),
    Demo("What is the capital of Italy?", "Rome"),
    Demo("A dull, plodding movie with no heart.", "negative"),
    Demo("What is the capital of Spain?", "Madrid"),
    Demo("Seven plus five", "12"),
    Demo("Nine minus four", "5"),
]


def test_nearest_picks_the_demos_most_like_each_input(generator):
    chosen = generator.selector.choose(POOL, ["What is the capital of Portugal?", "Three plus eight",
                                              "An awful film, I hated the plot."], Selection(k=2))
    assert chosen == [[1, 3], [4, 5], [0, 2]]  # in pool order, so equal picks are equal tasks


def test_first_and_random_give_every_input_the_same_demos(generator):
    inputs = ["a", "b", "c"]
    assert generator.selector.choose(POOL, inputs, Selection(k=3, by="first")) == [[0, 1, 2]] * 3
    once = generator.selector.choose(POOL, inputs, Selection(k=3, by="random", seed=7))
    assert len({tuple(c) for c in once}) == 1 and once == generator.selector.choose(POOL, inputs, Selection(k=3, by="random", seed=7))
    seeds = {tuple(generator.selector.choose(POOL, inputs, Selection(k=3, by="random", seed=s))[0]) for s in range(10)}
    assert len(seeds) > 3  # the seed matters


def test_inputs_that_pick_the_same_demos_share_one_adapter(generator):
    adapters = generator.generate_for(["What is the capital of France?", "What is the capital of Peru?", "Two plus two"],
                                      POOL, k=2, instruction="Answer.")
    assert adapters[0] is adapters[1] and adapters[0].task_hash != adapters[2].task_hash
    picked = generator.selector.tasks_for("Answer.", (), POOL, ["Two plus two"], Selection(k=2))[0]
    assert adapters[2].task_hash == generator.task_hash(picked) and picked.demos == (POOL[4], POOL[5])


@pytest.mark.parametrize("own, pool, selection, field", [
    ((), [], Selection(), "demo_pool"),
    ((), [Demo("a", "b")] * (MAX_POOL + 1), Selection(), "demo_pool"),
    ((), [Demo("a", "b"), Demo("c", " ")], Selection(k=1), "demo_pool.1.output"),
    ((), POOL, Selection(k=7), "select.k"),
    ((), POOL, Selection(k=0), "select.k"),
    ((Demo("x", "y"),) * 30, POOL, Selection(k=3), "select.k"),  # 32 demos in all
    ((), POOL, Selection(by="closest"), "select.by"),
])
def test_bad_pools_name_the_field(own, pool, selection, field):
    with pytest.raises(TaskError) as info:
        check_pool(own, pool, selection)
    assert info.value.field == field
