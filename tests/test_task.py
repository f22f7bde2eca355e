import re

import pytest

from hypergen.errors import TaskError
from hypergen.task import (
    MAX_DEMO_FIELD_CHARS,
    MAX_DEMOS,
    MAX_INSTRUCTION_CHARS,
    Demo,
    Task,
    read_demos_jsonl,
    task_hash,
)

SPEC = {"target_modules": ["q_proj", "v_proj"], "rank": 8, "alpha": 16.0, "base_dims": "x"}


def make(instruction="Say the opposite word.", demos=(("hot", "cold"), ("up", "down"))):
    return Task(instruction, tuple(Demo(i, o) for i, o in demos))


def test_hash_is_stable_and_normalises_instruction_whitespace():
    a = task_hash(make("Say the  opposite\n word. "), "fp", SPEC)
    b = task_hash(make("Say the opposite word."), "fp", SPEC)
    assert a == b
    assert re.fullmatch("[0-9a-f]{64}", a)
    assert task_hash(make("Say the same word."), "fp", SPEC) != a


@pytest.mark.parametrize(
    "change",
    [
        lambda: task_hash(make(demos=(("up", "down"), ("hot", "cold"))), "fp", SPEC),  # order
        lambda: task_hash(make(demos=(("hot", "cold "), ("up", "down"))), "fp", SPEC),  # demo text exact
        lambda: task_hash(make(), "other-fp", SPEC),  # another checkpoint
        lambda: task_hash(make(), "fp", {**SPEC, "rank": 16}),  # another spec
        lambda: task_hash(make("Say the opposite Word."), "fp", SPEC),  # case matters
    ],
)
def test_hash_changes_with_anything_that_changes_the_adapter(change):
    assert change() != task_hash(make(), "fp", SPEC)


def test_empty_instruction_without_demos_is_rejected():
    with pytest.raises(TaskError) as err:
        Task("   ", ())
    assert err.value.field == "instruction"


def test_empty_instruction_with_demos_is_allowed():
    assert Task("", (Demo("a", "b"),)).demos[0].output == "b"


def test_demo_without_output_names_the_demo():
    with pytest.raises(TaskError) as err:
        Task.from_dict({"instruction": "x", "demos": [{"input": "a", "output": "b"}, {"input": "c"}]})
    assert err.value.field == "demos.1.output"
    with pytest.raises(TaskError) as err:
        Task("x", (Demo("a", "b"), Demo("c", "  ")))
    assert err.value.field == "demos.1.output"


def test_over_long_fields_are_rejected_not_truncated():
    with pytest.raises(TaskError) as err:
        Task("x" * (MAX_INSTRUCTION_CHARS + 1))
    assert err.value.field == "instruction" and str(MAX_INSTRUCTION_CHARS) in err.value.message
    with pytest.raises(TaskError) as err:
        Task("x", (Demo("a" * (MAX_DEMO_FIELD_CHARS + 1), "b"),))
    assert err.value.field == "demos.0.input"
    with pytest.raises(TaskError) as err:
        Task("x", tuple(Demo("a", "b") for _ in range(MAX_DEMOS + 1)))
    assert err.value.field == "demos"
    assert len(Task("x", tuple(Demo("a", "b") for _ in range(MAX_DEMOS))).demos) == MAX_DEMOS


def test_non_string_fields_are_rejected():
    with pytest.raises(TaskError) as err:
        Task.from_dict({"instruction": "x", "demos": [{"input": 3, "output": "b"}]})
    assert err.value.field == "demos.0.input"


def test_read_demos_jsonl_reports_bad_lines():
    demos = read_demos_jsonl(['{"input": "a", "output": "b"}', "", '{"input": "c", "output": "d"}'])
    assert [d.output for d in demos] == ["b", "d"]
    with pytest.raises(TaskError) as err:
        read_demos_jsonl(['{"input": "a", "output": "b"}', "{nope"], source="demos.jsonl")
    assert err.value.field == "demos.jsonl" and "line 2" in err.value.message
