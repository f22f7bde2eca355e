"""The generator process (server/generator_process.py): real child processes on the test
checkpoint. It must give the bytes the server's own process would, and a child that dies or
cannot load must cost speed, never an answer."""
from __future__ import annotations

import os
import signal

import pytest
import torch

from hypergen.adapter import Adapter
from hypergen.generator import HyperGenerator
from hypergen.task import Demo, Task
from server import generator_process
from server.generator_process import FailedInChild, GeneratorProcess, GeneratorProcessError

TASKS = [
    Task("Answer with the antonym of the given word.", (Demo("hot", "cold"), Demo("up", "down"))),
    Task("Translate the number into Roman numerals."),
]


def in_process_blob(generator: HyperGenerator, task: Task, task_hash: str) -> bytes:
    adapter = generator.generate(task)
    adapter.task_hash = task_hash
    return adapter.to_bytes()


@pytest.fixture(scope="module")
def process(checkpoint_dir):
    proc = GeneratorProcess(str(checkpoint_dir), None, "cpu", "float32")
    proc.start()
    proc.wait_ready()
    yield proc
    proc.close()


def test_the_process_gives_the_bytes_the_server_process_would(process, checkpoint_dir):
    here = HyperGenerator.from_pretrained(checkpoint_dir, dtype="float32")
    for i, task in enumerate(TASKS):
        task_hash = f"{i:064x}"
        blob, stages = process.generate(task, task_hash)
        assert blob == in_process_blob(here, task, task_hash)
        assert set(stages) == {"encode_ms", "hypernetwork_ms", "tensors_ms", "serialise_ms"}
        assert all(ms > 0 for ms in stages.values())


def test_a_batch_in_the_process_gives_the_bytes_of_the_same_batch_in_the_server(process, checkpoint_dir):
    here = HyperGenerator.from_pretrained(checkpoint_dir, dtype="float32")
    hashes = [f"{i + 7:064x}" for i in range(len(TASKS))]
    made = process.generate_many(TASKS, hashes)
    ours = generator_process.adapter_blobs(here, TASKS, hashes)
    assert [Adapter.from_bytes(blob).task_hash for blob, _ in made] == hashes  # in order, each with its own hash
    for (theirs, _), (mine, _) in zip(made, ours):
        # equal up to float rounding: an embedding the child cached from an earlier single run was
        # summed in another order than the same text packed into this batch
        a, b = Adapter.from_bytes(theirs).tensors, Adapter.from_bytes(mine).tensors
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in a)
    assert all(set(stages) == {"encode_ms", "hypernetwork_ms", "tensors_ms", "serialise_ms"} for _, stages in made)


class Unreadable:
    """A task whose wire form the child refuses (no instruction and no demos): it fails in the child."""

    def to_dict(self) -> dict:
        return {"instruction": "", "demos": []}


def test_a_batch_that_fails_in_the_child_is_not_the_childs_failure(process, checkpoint_dir):
    pid, failures = process.pid, process.failures
    with pytest.raises(FailedInChild, match="instruction"):
        process.generate_many([TASKS[0], Unreadable()], ["0" * 64, "1" * 64])
    assert process.pid == pid and process.failures == failures and process.ready  # the same child goes on
    blob, _ = process.generate(TASKS[0], "0" * 64)
    assert blob == in_process_blob(HyperGenerator.from_pretrained(checkpoint_dir, dtype="float32"), TASKS[0], "0" * 64)


def test_a_killed_child_fails_one_call_and_a_new_one_takes_over(process, checkpoint_dir, monkeypatch):
    monkeypatch.setattr(generator_process, "RETRY_S", 0.0)
    first = process.pid
    os.kill(first, signal.SIGKILL)
    with pytest.raises(GeneratorProcessError, match="died"):
        process.generate(TASKS[0], "0" * 64)
    assert process.failures == 1 and not process.ready
    with pytest.raises(GeneratorProcessError, match="starting"):  # never waits for the new child
        process.generate(TASKS[0], "0" * 64)
    process.wait_ready()
    assert process.pid not in (None, first)
    blob, _ = process.generate(TASKS[0], "0" * 64)
    assert blob == in_process_blob(HyperGenerator.from_pretrained(checkpoint_dir, dtype="float32"), TASKS[0], "0" * 64)


def test_a_child_that_cannot_load_reports_why_and_is_not_restarted_at_once(tmp_path):
    broken = GeneratorProcess(str(tmp_path / "missing"), None, "cpu", "float32")
    broken.start()
    with pytest.raises(GeneratorProcessError, match="could not load the checkpoint"):
        broken.wait_ready()
    assert broken.failures == 1 and broken.pid is None
    with pytest.raises(GeneratorProcessError):
        broken.generate(TASKS[0], "0" * 64)
    assert broken.pid is None  # within RETRY_S of the failure: no new child yet
    broken.close()


def test_a_server_start_that_fails_after_the_child_started_stops_the_child(checkpoint_dir, monkeypatch, tmp_path):
    import asyncio

    from hypergen import engines
    from hypergen.settings import Settings
    from server.app import build_state

    started: list[GeneratorProcess] = []
    real_start = GeneratorProcess.start

    def start(self: GeneratorProcess) -> None:
        real_start(self)
        started.append(self)

    def no_engine(*_args, **_kwargs):  # noqa: ANN002, ANN003
        raise RuntimeError("the engine could not start")

    monkeypatch.setattr(GeneratorProcess, "start", start)
    monkeypatch.setattr(engines, "create_engine", no_engine)
    settings = Settings(checkpoint=str(checkpoint_dir), engine="hf", redis_url=None, adapter_dir=str(tmp_path / "adapters"))
    with pytest.raises(RuntimeError, match="engine could not start"):
        asyncio.run(build_state(settings))
    assert len(started) == 1 and started[0].pid is None  # stopped and waited for, not left to exit on its own
