"""Task data for training and evaluation: Super-NaturalInstructions files and plain JSONL.

S-NI task files (``tasks/<name>.json``) have a ``Definition`` (list of strings),
``Positive Examples`` ({input, output, explanation}) and ``Instances`` ({id,
input, output: [references]}). Split files list task names, one per line. The
same reader takes this project's shared subset and the full S-NI ``tasks/``
folder. User tasks come as JSONL, one task per line:
``{"name"?, "instruction", "demos": [{input, output}], "instances": [{input, output | outputs}]}``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from hypergen.errors import HypergenError
from hypergen.task import Demo, Task


class TaskFileError(HypergenError):
    code = "invalid_task_file"


@dataclass(frozen=True)
class Instance:
    input: str
    outputs: tuple[str, ...]


@dataclass
class TaskData:
    """One task: its instruction, demonstrations, and instances to train on or score."""

    name: str
    instruction: str
    demos: list[Demo]
    instances: list[Instance]
    categories: list[str] = field(default_factory=list)

    def task(self, demos: Iterable[Demo] | None = None) -> Task:
        """The hypernetwork's view of this task (instruction + the given or all demos)."""
        return Task(self.instruction, tuple(self.demos if demos is None else demos))


def _require(data: dict[str, Any], key: str, kind: type, path: Path) -> Any:
    if key not in data:
        raise TaskFileError(f"{path}: missing {key!r}", str(path))
    if not isinstance(data[key], kind):
        raise TaskFileError(f"{path}: {key!r} must be a {kind.__name__}", str(path))
    return data[key]


def load_sni_task(path: str | Path) -> TaskData:
    """Reads one S-NI task file; any schema problem raises TaskFileError naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TaskFileError(f"{path}: no such task file", str(path)) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TaskFileError(f"{path}: not valid JSON ({exc})", str(path)) from None
    if not isinstance(data, dict):
        raise TaskFileError(f"{path}: a task file holds one JSON object", str(path))
    definition = _require(data, "Definition", list, path)
    demos = []
    for i, ex in enumerate(data.get("Positive Examples") or []):
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str) or not isinstance(ex.get("output"), str):
            raise TaskFileError(f"{path}: Positive Examples[{i}] needs string 'input' and 'output'", str(path))
        if ex["output"].strip():
            demos.append(Demo(ex["input"], ex["output"]))
    instances = []
    for i, inst in enumerate(_require(data, "Instances", list, path)):
        outputs = inst.get("output") if isinstance(inst, dict) else None
        if isinstance(outputs, str):
            outputs = [outputs]
        if not isinstance(inst, dict) or not isinstance(inst.get("input"), str) or not outputs or not all(isinstance(o, str) for o in outputs):
            raise TaskFileError(f"{path}: Instances[{i}] needs a string 'input' and a list of string 'output'", str(path))
        instances.append(Instance(inst["input"], tuple(outputs)))
    return TaskData(
        name=str(data.get("name") or path.stem),
        instruction=" ".join(s.strip() for s in definition if isinstance(s, str)).strip(),
        demos=demos,
        instances=instances,
        categories=list(data.get("Categories") or []),
    )


def split_names(split_file: str | Path) -> list[str]:
    path = Path(split_file)
    if not path.is_file():
        raise TaskFileError(f"{path}: no such split file", str(path))
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def find_split_file(root: str | Path, split: str) -> Path:
    """``splits/<split>_tasks.txt`` (this project's subset), ``splits/default/...`` (full S-NI),
    or ``split`` itself when it is a ``.txt`` file (e.g. a validation split of your own)."""
    if split.endswith(".txt") and Path(split).is_file():
        return Path(split)
    root = Path(root)
    for candidate in (root / "splits" / f"{split}_tasks.txt", root / "splits" / "default" / f"{split}_tasks.txt"):
        if candidate.is_file():
            return candidate
    raise TaskFileError(f"{root}: no split file for {split!r} under splits/", str(root))


def load_sni(root: str | Path, split: str | None = None, names: Iterable[str] | None = None, limit: int | None = None) -> list[TaskData]:
    """Tasks of an S-NI folder, by split name or explicit task names, in split-file order."""
    root = Path(root)
    if names is None:
        names = split_names(find_split_file(root, split or "train"))
    names = list(names)[:limit] if limit else list(names)
    return [load_sni_task(root / "tasks" / f"{name}.json") for name in names]


def load_jsonl_tasks(path: str | Path) -> list[TaskData]:
    path = Path(path)
    tasks = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            raw = json.loads(line)
            task = Task.from_dict({"instruction": raw.get("instruction", ""), "demos": raw.get("demos") or []})
            instances = []
            for inst in raw.get("instances") or []:
                outputs = inst.get("outputs") or [inst["output"]]
                instances.append(Instance(str(inst["input"]), tuple(str(o) for o in outputs)))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise TaskFileError(f"{where}: bad task line ({exc})", str(path)) from None
        tasks.append(TaskData(raw.get("name") or f"{path.stem}-{n}", task.instruction, list(task.demos), instances))
    return tasks
