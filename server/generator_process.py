"""Adapter generation in a process of its own, beside the server.

Why: the same generation (task encoder, hypernetwork, blob) takes about 1.4x as long on the
server's hypernetwork thread as in a process that does nothing else, every stage alike, with the
engine idle and no other Python thread busy (README, Benchmarks: probes side by side). A child
that holds only torch, the encoder and the hypernetwork runs at the standalone speed.

Protocol, over a socket pair, as ``multiprocessing.connection`` frames of JSON and bytes (no
pickles): the server sends ``{"tasks": [...], "task_hashes": [...]}`` (a batch of misses,
``server/miss_batches.py``); the child answers a JSON header (``{"stages": [{...} per task]}`` or
``{"error": ...}``) and then one blob per task, in order. One call at a time: the adapter service
has one hypernetwork thread.

Failure is contained: a child that dies, stops answering or cannot load makes ``generate``
raise ``GeneratorProcessError`` and the service generates in its own process; a new child starts
``RETRY_S`` later and takes over once it is ready, so no request waits on a child's start. The
child exits when the server's end of the socket closes, so it never outlives a killed server.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from hypergen.adapter import to_blobs
from hypergen.generator import HyperGenerator
from hypergen.task import Task
from server.miss_batches import Made

log = logging.getLogger(__name__)

READY = {"ready": True}
START_TIMEOUT_S = 300.0  # loading torch, the encoder and the network; a cold disk on a busy host
CALL_TIMEOUT_S = 60.0  # one generation takes tens of milliseconds; past this the child is stuck
RETRY_S = 5.0  # after a failure, the least time before a new child is started
SOCKET_BUFFER = 4 << 20  # bytes asked for each way: a whole blob (1.9 MB) in one write, not ~9 alternating ones (the kernel caps it at net.core.[rw]mem_max)


class GeneratorProcessError(RuntimeError):
    """The child could not answer this call (not started, died, stuck, or failed on the task)."""


class FailedInChild(GeneratorProcessError):
    """The child is sound and answered, but this batch raised in it (the tasks, not the process)."""


@dataclass(eq=False)
class GeneratorProcess:
    """The server's end: starts the child, sends it tasks, and restarts it after a failure."""

    checkpoint: str
    base_model: str | None
    device: str
    dtype: str
    adapter_dtype: str = "float32"
    failures: int = field(default=0, init=False)  # children stopped for failing (a metric)
    _proc: subprocess.Popen | None = field(default=None, init=False)
    _conn: Connection | None = field(default=None, init=False)
    _ready: bool = field(default=False, init=False)
    _retry_at: float = field(default=0.0, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def start(self) -> None:
        """Starts a child (returns at once; ``wait_ready`` waits for its load and warm-up)."""
        with self._lock:
            self._start()

    def _start(self) -> None:
        self._stop()
        ours, theirs = socket.socketpair()
        for end in (ours, theirs):
            widen(end)
        args = json.dumps({"checkpoint": self.checkpoint, "base_model": self.base_model, "device": self.device,
                           "dtype": self.dtype, "adapter_dtype": self.adapter_dtype})
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "server.generator_process", "--fd", str(theirs.fileno()), "--args", args],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
            )
        except OSError as exc:
            ours.close()
            raise self._failed(f"the generator process could not be started ({exc})") from None
        finally:
            theirs.close()
        self._conn = Connection(ours.detach())

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Blocks until the child has loaded and warmed up (the server's start); raises
        GeneratorProcessError if it cannot."""
        with self._lock:
            if self._conn is None:
                self._start()
            if not self._conn.poll(timeout):
                raise self._failed(f"the generator process was not ready after {timeout:.0f} s")
            if not self._poll_ready():
                raise GeneratorProcessError("the generator process did not start")

    def _poll_ready(self) -> bool:
        """Reads the child's ready message if it has come (never blocks); a child that reported a
        failure or died instead is stopped."""
        if self._ready:
            return True
        if self._conn is None:  # stopped after a failure: a new one after RETRY_S
            if time.monotonic() >= self._retry_at:
                self._start()
            return False
        try:
            if not self._conn.poll(0):
                return False
            answer = json.loads(self._conn.recv_bytes())
        except (EOFError, OSError, ValueError) as exc:
            raise self._failed(f"the generator process did not start ({exc or type(exc).__name__})") from None
        if answer != READY:
            raise self._failed(f"the generator process could not load the checkpoint: {answer.get('error', answer)}")
        self._ready = True
        return True

    def generate(self, task: Task, task_hash: str) -> Made:
        """The adapter blob for ``task`` (carrying ``task_hash``) and its stage timings in ms."""
        return self.generate_many([task], [task_hash])[0]

    def generate_many(self, tasks: list[Task], task_hashes: list[str]) -> list[Made]:
        """Blobs and stage timings for a batch of tasks, in one batched pass in the child.

        Never waits for a child to start: while one loads (after a failure), this raises and the
        caller generates in its own process.
        """
        with self._lock:
            if not self._poll_ready():
                raise GeneratorProcessError("the generator process is starting")
            try:
                self._conn.send_bytes(json.dumps({"tasks": [t.to_dict() for t in tasks], "task_hashes": task_hashes}).encode())
                if not self._conn.poll(CALL_TIMEOUT_S):
                    raise self._failed(f"the generator process gave no answer in {CALL_TIMEOUT_S:.0f} s")
                header = json.loads(self._conn.recv_bytes())
                if "error" in header:  # the child is fine; this batch failed in it
                    raise FailedInChild(header["error"])
                blobs = [self._conn.recv_bytes() for _ in tasks]
            except (EOFError, OSError) as exc:
                raise self._failed(f"the generator process died ({exc or type(exc).__name__})") from None
        return list(zip(blobs, header["stages"]))

    def _failed(self, message: str) -> GeneratorProcessError:
        """Stops a child that cannot be trusted any more; a new one starts RETRY_S later, on the
        next call (so a child that cannot load is not restarted in a loop)."""
        self._stop(kill=True)
        self.failures += 1
        self._retry_at = time.monotonic() + RETRY_S
        log.error("%s; generating in the server process until a new one is ready", message)
        return GeneratorProcessError(message)

    def _stop(self, kill: bool = False) -> None:
        """Ends the child: asked (EOF on its socket), or killed when it failed and may be stuck."""
        self._ready = False
        if self._conn is not None:
            self._conn.close()  # the child reads EOF and exits
            self._conn = None
        if self._proc is not None:
            if kill:
                self._proc.kill()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def close(self) -> None:
        with self._lock:
            self._stop()


def widen(end: socket.socket) -> None:
    """Asks for socket buffers that hold a whole blob. With the default (~200 KB) the child's
    1.9 MB blob crossed in about nine chunks, each waking the server's reader once: 2.4 ms and
    2.0 ms of the reader's CPU a blob, against 1.1 and 0.6 with 4 MB (README, Benchmarks)."""
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            end.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        except OSError:  # a smaller buffer only costs speed
            pass


def adapter_blobs(generator: HyperGenerator, tasks: list[Task], task_hashes: list[str]) -> list[Made]:
    """Misses made into bytes in one batched pass, each with its stage timings in ms (its share of
    the batch's encoder, network and tensor time, and its own serialisation): in the child, and in
    the server when it generates itself. Each blob carries its ``task_hash`` (a tenant's own copy
    carries its scoped id). Reads ``generator.last_timings``, so the generator must have no other
    caller meanwhile."""
    adapters = generator.generate_many(tasks)
    share = {stage: ms / len(tasks) for stage, ms in generator.last_timings.items()}
    for adapter, task_hash in zip(adapters, task_hashes):
        adapter.task_hash = task_hash
    return [(blob, {**share, "serialise_ms": ms}) for blob, ms in to_blobs(adapters)]


def serve(conn: Connection, checkpoint: str, base_model: str | None, device: str, dtype: str, adapter_dtype: str = "float32") -> None:
    """The child's loop: load, warm up, say ready, then a batch of tasks in, their blobs out, until EOF."""
    try:
        generator = HyperGenerator.from_pretrained(checkpoint, base_model, device, dtype, adapter_dtype)
        generator.warm_up()
    except Exception as exc:  # reported to the server, which generates in its own process instead
        conn.send_bytes(json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
        return
    conn.send_bytes(json.dumps(READY).encode())
    while True:
        try:
            request = json.loads(conn.recv_bytes())
        except EOFError:
            return
        try:
            made = adapter_blobs(generator, [Task.from_dict(t) for t in request["tasks"]], request["task_hashes"])
        except Exception as exc:  # noqa: BLE001 (one bad batch must not end the child)
            log.exception("generation failed in the generator process")
            conn.send_bytes(json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
            continue
        conn.send_bytes(json.dumps({"stages": [stages for _, stages in made]}).encode())
        for blob, _ in made:
            conn.send_bytes(blob)


def main() -> None:
    parser = argparse.ArgumentParser(description="hypergen's generator process (started by the server)")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--args", required=True)
    options = parser.parse_args()
    logging.basicConfig(level=os.environ.get("HYPERGEN_LOG_LEVEL", "INFO"), format="%(asctime)s generator %(levelname)s %(message)s")
    serve(Connection(options.fd), **json.loads(options.args))


if __name__ == "__main__":
    main()
