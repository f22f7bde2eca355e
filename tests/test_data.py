import json

import pytest

from hypergen.data import TaskFileError, load_jsonl_tasks, load_sni, load_sni_task
from hypergen.synthetic import synthetic_tasks


def write_sni(root, tasks: dict[str, dict], split: str = "train"):
    (root / "tasks").mkdir(parents=True, exist_ok=True)
    (root / "splits").mkdir(exist_ok=True)
    for name, body in tasks.items():
        (root / "tasks" / f"{name}.json").write_text(json.dumps(body))
    (root / "splits" / f"{split}_tasks.txt").write_text("\n".join(tasks) + "\n")
    return root


def sni_task(name: str, n: int = 6, definition: str = "Answer with the antonym of the word.") -> dict:
    words = [("hot", "cold"), ("up", "down"), ("big", "small"), ("fast", "slow"), ("old", "new"), ("wet", "dry"), ("in", "out"), ("on", "off")]
    return {
        "name": name,
        "Definition": [definition],
        "Positive Examples": [{"input": "light", "output": "dark", "explanation": "opposite"}],
        "Negative Examples": [],
        "Categories": ["Word Semantics"],
        "Instances": [{"id": f"{name}-{i}", "input": words[i % 8][0], "output": [words[i % 8][1]]} for i in range(n)],
    }


def test_loads_an_sni_folder_by_split(tmp_path):
    write_sni(tmp_path, {"task001_antonyms": sni_task("task001_antonyms"), "task002_more": sni_task("task002_more", 4)})
    tasks = load_sni(tmp_path, "train")
    assert [t.name for t in tasks] == ["task001_antonyms", "task002_more"]
    first = tasks[0]
    assert first.instruction == "Answer with the antonym of the word."
    assert first.demos[0].input == "light" and first.demos[0].output == "dark"
    assert len(first.instances) == 6 and first.instances[1].outputs == ("down",)
    assert first.task().demos == tuple(first.demos)


def test_full_sni_layout_with_default_split_folder(tmp_path):
    (tmp_path / "splits" / "default").mkdir(parents=True)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "task9.json").write_text(json.dumps(sni_task("task9")))
    (tmp_path / "splits" / "default" / "test_tasks.txt").write_text("task9\n")
    assert load_sni(tmp_path, "test")[0].name == "task9"


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"Instances": []}), "missing 'Definition'"),
        (json.dumps({"Definition": ["x"], "Instances": [{"input": "a"}]}), "Instances[0]"),
        (json.dumps({"Definition": ["x"], "Instances": [], "Positive Examples": [{"input": 1}]}), "Positive Examples[0]"),
    ],
)
def test_malformed_task_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "task_bad.json"
    path.write_text(content)
    with pytest.raises(TaskFileError) as err:
        load_sni_task(path)
    assert str(path) in err.value.message and message in err.value.message


def test_jsonl_tasks(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(
        json.dumps({"name": "shout", "instruction": "Uppercase it.", "demos": [{"input": "a", "output": "A"}],
                    "instances": [{"input": "b", "output": "B"}, {"input": "c", "outputs": ["C", "c!"]}]}) + "\n"
    )
    [task] = load_jsonl_tasks(path)
    assert task.name == "shout" and task.instances[1].outputs == ("C", "c!")
    path.write_text('{"instruction": "x", "instances": [{"output": "y"}]}\n')
    with pytest.raises(TaskFileError, match="mine.jsonl:1"):
        load_jsonl_tasks(path)


def test_synthetic_tasks_are_correct_and_varied():
    tasks = synthetic_tasks(30, seed=1)
    assert len({t.instruction for t in tasks}) >= 25  # families repeat; paraphrases and labels vary
    reverse = next(t for t in tasks if t.name.startswith("synthetic_reverse"))
    assert all(inst.outputs[0] == inst.input[::-1] for inst in reverse.instances)
    labels = [t for t in tasks if "label" in t.name]
    assert labels and all(len({i.outputs[0] for i in t.instances} | {d.output for d in t.demos}) <= 2 for t in labels)
    assert synthetic_tasks(5, seed=1)[0].instances == tasks[0].instances  # deterministic
