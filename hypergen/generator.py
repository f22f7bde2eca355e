"""HyperGenerator: the one object that turns tasks into adapters.

It owns the frozen task encoder and the hypernetwork, knows the LoRA spec and the
checkpoint fingerprint, and therefore the task hash. Everything that serves
adapters (CLI, server, evaluation) goes through it.
"""
from __future__ import annotations

import functools
import logging
import time
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import torch

from hypergen.adapter import Adapter, peft_key
from hypergen.base_model import compute_dtype, load_dims
from hypergen.encoder import TaskEncoder
from hypergen.errors import CheckpointError, HypergenError
from hypergen.hypernet import HyperNetConfig, HyperNetwork, int8_available
from hypergen.packed_linear import pack_linears
from hypergen.settings import DEFAULT_BASE_MODEL, DEFAULT_CHECKPOINT, DEFAULT_ENCODER
from hypergen.spec import LoraSpec
from hypergen.selection import PoolSelector, Selection
from hypergen.task import Demo, Task, task_hash
from hypergen.task_items import encode_tasks

log = logging.getLogger(__name__)


ADAPTER_DTYPES = ("float32", "bfloat16")  # what an adapter's tensors may be stored in (HYPERGEN_ADAPTER_DTYPE)


def packaged_checkpoint() -> Path:
    """The checkpoint shipped inside the package (may be absent in a source tree before training)."""
    return Path(str(resources.files("hypergen") / "checkpoints" / "default"))


def generation_dtype(requested: str = "auto", device: str = "cpu") -> str:
    """What the encoder and hypernetwork compute in: ``float32``, ``bfloat16`` or ``int8`` (the
    network's heads in int8, the rest float32; ``HyperNetwork.quantize_heads``). A network that
    ``needs_float32`` (a centred one) keeps float32 whatever this says; the encoder follows it.

    ``auto``: bfloat16 where the hardware computes it natively (as for the base model); else,
    on a CPU with int8 kernels, int8; else float32. Raises HypergenError for int8 off the CPU.
    """
    if requested == "auto":
        if compute_dtype("auto") == "bfloat16":
            return "bfloat16"
        return "int8" if device == "cpu" and int8_available() else "float32"
    if requested == "int8" and (device != "cpu" or not int8_available()):
        raise HypergenError("int8 generation needs the CPU and torch's x86 int8 kernels; use float32 or bfloat16", "generator_dtype")
    return requested


class HyperGenerator:
    """Task in, Adapter out, in one hypernetwork forward pass."""

    def __init__(
        self,
        network: HyperNetwork,
        encoder: TaskEncoder,
        fingerprint: str,
        base_model: str,
        checkpoint: str,
        device: str = "cpu",
        adapter_dtype: str = "float32",
    ) -> None:
        self.network = pack_linears(network.to(device).eval())  # float32 on a CPU: reordered weights (hypergen/packed_linear.py)
        self.encoder = encoder
        self.fingerprint = fingerprint
        self.base_model = base_model
        self.checkpoint = checkpoint
        self.device = device
        if adapter_dtype not in ADAPTER_DTYPES:
            raise HypergenError(f"adapters are stored in one of {', '.join(ADAPTER_DTYPES)}, not {adapter_dtype!r}", "adapter_dtype")
        self.adapter_dtype = adapter_dtype  # what adapters' tensors are stored in (the server: ``engines.adapter_dtype``)
        self._selector: PoolSelector | None = None
        self.last_timings: dict[str, float] = {}  # ms per stage of the last generate_many (benchmarks, profiling)

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | Path = DEFAULT_CHECKPOINT,
        base_model: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        adapter_dtype: str = "float32",
    ) -> "HyperGenerator":
        """Loads a checkpoint folder, or 'default' for the packaged one, and checks it fits the base.

        ``dtype`` is what the encoder and the network compute in (``generation_dtype``): float32
        by default, so library calls and evaluations are exact; the server and CLI pass
        ``HYPERGEN_GENERATOR_DTYPE``. ``adapter_dtype`` is what the adapters' tensors are stored in
        (float32, or bfloat16 for an engine that rounds them to bf16 anyway: the server's
        ``HYPERGEN_ADAPTER_DTYPE``); they are computed in float32 and rounded once at the end.

        With 'default' and no trained checkpoint in the package (a source tree
        before training), an untrained network for the base model is built
        from seed 0: its adapters are no-ops, and ``info()`` says so.
        """
        if str(checkpoint) == DEFAULT_CHECKPOINT:
            path = packaged_checkpoint()
            if not (path / "config.json").is_file():
                log.warning("no trained checkpoint is packaged; using an untrained (no-op) hypernetwork")
                return cls.untrained(base_model or DEFAULT_BASE_MODEL, device=device)
        else:
            path = Path(checkpoint).expanduser()
        network, fingerprint = HyperNetwork.load(path, device=device)
        precision = generation_dtype(dtype, device)
        torch_dtype = torch.float32 if precision == "int8" else getattr(torch, precision)
        network.compute_in(torch_dtype)
        if precision == "int8":
            network.quantize_heads()
        base = base_model or network.config.base_model
        network.config.check_base(load_dims(base))
        encoder = TaskEncoder(network.config.encoder, device=device, dtype=torch_dtype, layers=network.config.encoder_layers)
        if encoder.dim != network.config.encoder_dim:
            raise CheckpointError(
                f"encoder {network.config.encoder!r} gives {encoder.dim}-d vectors; the checkpoint expects {network.config.encoder_dim}",
                "encoder",
            )
        return cls(network, encoder, fingerprint, base, str(path), device, adapter_dtype)

    @classmethod
    def untrained(
        cls,
        base_model: str = DEFAULT_BASE_MODEL,
        spec_overrides: dict[str, Any] | None = None,
        encoder: str = DEFAULT_ENCODER,
        seed: int = 0,
        device: str = "cpu",
        **sizes: Any,
    ) -> "HyperGenerator":
        """A freshly initialised network for a base model: the starting point of training."""
        spec = LoraSpec(dims=load_dims(base_model), **(spec_overrides or {}))
        enc = TaskEncoder(encoder, device=device, layers=sizes.get("encoder_layers", 0))
        config = HyperNetConfig.for_spec(spec, base_model, encoder, enc.dim, **sizes)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            network = HyperNetwork(config)
        return cls(network, enc, network.fingerprint(), base_model, f"untrained(seed={seed})", device)

    @property
    def spec(self) -> LoraSpec:
        return self.network.spec

    @property
    def compute_dtype(self) -> str:
        """What the network's heads compute in (``generation_dtype``)."""
        return self.network.compute_precision

    @property
    def encoder_dtype(self) -> str:
        """What the task encoder computes in (``generation_dtype``; a centred network's may differ)."""
        return str(next(self.encoder.model.parameters()).dtype).removeprefix("torch.")

    @property
    def trained(self) -> bool:
        return bool(self.network.config.training)

    def task_hash(self, task: Task) -> str:
        return task_hash(task, self.fingerprint, self._spec_dict)

    @functools.cached_property
    def _spec_dict(self) -> dict[str, Any]:
        """The spec as the task hash reads it, made once: hashing the base model's dims on every
        request cost the server about half a millisecond a request."""
        return self.spec.to_dict()

    def generate(self, task: Task) -> Adapter:
        return self.generate_many([task])[0]

    def warm_up(self) -> None:
        """Runs the whole path (encoder, network, tensors, blob) on made-up tasks of a few sizes.

        A server calls it once, on the thread that will serve its misses, so its first real
        miss does not also pay for the thread pool's start, kernel choice and first allocations.
        """
        words = "warm up the path before the first request arrives".split()
        for n_demos in (0, 3, 8):
            demos = [Demo(" ".join(words[: 2 + i % 6]) * (1 + i), words[i % len(words)]) for i in range(n_demos)]
            self.generate(Task(f"Warm-up task with {n_demos} demos: " + " ".join(words), tuple(demos))).to_bytes()

    @property
    def selector(self) -> PoolSelector:
        """Chooses pool demos per input (keeps pools' embeddings; made on first use)."""
        if self._selector is None:
            self._selector = PoolSelector(self.encoder)
        return self._selector

    def generate_for(self, inputs: Sequence[str], pool: Sequence[Demo], k: int = 4, by: str = "nearest",
                     instruction: str = "", seed: int = 0) -> list[Adapter]:
        """One adapter per input, from the ``k`` pool demos chosen for it (see ``hypergen.selection``);
        inputs that choose the same demos get the same adapter, generated once."""
        tasks = self.selector.tasks_for(instruction, (), pool, inputs, Selection(k, by, seed))
        distinct = {self.task_hash(t): t for t in tasks}
        made = dict(zip(distinct, self.generate_many(list(distinct.values()))))
        return [made[self.task_hash(t)] for t in tasks]

    @torch.inference_mode()
    def generate_many(self, tasks: Sequence[Task]) -> list[Adapter]:
        """One batched encoder call and one batched hypernetwork pass for all tasks."""
        if not tasks:
            return []
        start = time.perf_counter()
        batch = encode_tasks(self.encoder, tasks, self.network.config.demo_encoding, self.device)
        encoded = time.perf_counter()
        weights = self.network(batch.items, batch.kinds, batch.mask)
        ran = time.perf_counter()
        adapters = [self._adapter(t, weights, self.task_hash(task)) for t, task in enumerate(tasks)]
        done = time.perf_counter()
        self.last_timings = {"encode_ms": (encoded - start) * 1000, "hypernetwork_ms": (ran - encoded) * 1000,
                             "tensors_ms": (done - ran) * 1000}
        return adapters

    @torch.inference_mode()
    def shared_adapter(self) -> Adapter:
        """The network's shared LoRA alone (what every generated adapter is a correction of): the
        multi-task part, e.g. to compose with a generated adapter or to serve as a task-free baseline."""
        return self._adapter(0, self.network.shared(), None, part="shared")

    def _adapter(self, t: int, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], task_hash: str | None,
                 **meta: str) -> Adapter:
        tensors: dict[str, torch.Tensor] = {}
        for module, pair in weights.items():
            for which, stacked in zip("AB", pair):
                # one copy of the task's [L, ...] block in the stored dtype, split into per-layer views: a
                # copy per layer cost 4x as much (0.63 against 0.15 ms per adapter, in batches of 16)
                for layer, tensor in enumerate(stacked[t].to("cpu", self._stored, copy=True).unbind(0)):
                    tensors[peft_key(layer, module, which)] = tensor
        return Adapter(
            tensors=tensors,
            base_model=self.base_model,
            target_modules=list(self.spec.target_modules),
            rank=self.spec.rank,
            alpha=self.spec.alpha,
            task_hash=task_hash,
            meta={"hypernetwork": self.fingerprint, **meta},
        )

    @property
    def _stored(self) -> torch.dtype:
        return getattr(torch, self.adapter_dtype)

    def info(self) -> dict[str, Any]:
        """What `hypergen info` prints and the server reports."""
        n_params = sum(p.numel() for p in self.network.parameters())
        return {
            "base_model": self.base_model,
            "base_dims": self.network.config.base_dims,
            "encoder": self.network.config.encoder,
            "encoder_layers": self.network.config.encoder_layers,  # 0: all of them
            "checkpoint": self.checkpoint,
            "hypernetwork_fingerprint": self.fingerprint,
            "trained": self.trained,
            "training": self.network.config.training,
            "lora_spec": self.spec.to_dict(),
            "hypernetwork_params": n_params,
            "hypernetwork_dtype": self.compute_dtype,
            "encoder_dtype": self.encoder_dtype,
            "adapter_dtype": self.adapter_dtype,
            "adapter_params": self.spec.num_adapter_params(),
            "encoder_params": sum(p.numel() for p in self.encoder.model.parameters()),
        }
