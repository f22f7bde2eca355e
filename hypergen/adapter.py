"""A generated LoRA: its tensors, its PEFT config, and the two ways it leaves the process.

``save_peft`` writes the folder that ``peft.PeftModel.from_pretrained`` and vLLM's
``LoRARequest`` load. ``to_bytes`` writes one self-describing safetensors blob for
caches: the PEFT config, task hash and metadata ride in its safetensors metadata with
a SHA-256 over all of it and the tensors, and ``from_bytes`` refuses a blob whose
checksum does not match (a flipped alpha is as damaged as a flipped weight).
"""
from __future__ import annotations

import functools
import hashlib
import json
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load, load_file, save_file

from hypergen.errors import CorruptAdapterError
from hypergen.spec import module_block
from hypergen.task import canonical_json

BLOB_FORMAT = "hypergen-adapter/2"  # /2: the checksum covers the metadata too
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
TRAINING_FILE = "hypergen_training.json"  # beside a trained LoRA's PEFT files: which tasks and instances it saw


def peft_key(layer: int, module: str, which: str) -> str:
    """PEFT's state-dict name for one LoRA matrix of a Llama-style decoder (which = 'A' or 'B')."""
    return f"base_model.model.model.layers.{layer}.{module_block(module)}.{module}.lora_{which}.weight"


@dataclass
class Adapter:
    """LoRA tensors keyed by PEFT names, plus what PEFT needs to rebuild the config."""

    tensors: dict[str, torch.Tensor]
    base_model: str
    target_modules: list[str]
    rank: int
    alpha: float
    task_hash: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def peft_config(self) -> dict[str, Any]:
        """PEFT's own LoraConfig, as the JSON its ``save_pretrained`` writes (what PEFT and vLLM read)."""
        return json.loads(_peft_config_json(self.rank, self.alpha, tuple(self.target_modules), self.base_model))

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def layer_weights(self, layer: int, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tensors[peft_key(layer, module, "A")], self.tensors[peft_key(layer, module, "B")]

    def stacked(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{module: (A [L, r, in], B [L, out, r])} in float32: the layout the hypernetwork emits."""
        n_layers = 1 + max(int(k.split(".layers.")[1].split(".")[0]) for k in self.tensors)
        return {
            m: tuple(torch.stack([self.layer_weights(i, m)[w] for i in range(n_layers)]).float() for w in (0, 1))
            for m in self.target_modules
        }

    def save_peft(self, directory: str | Path) -> Path:
        """Writes a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # own copies: a generated adapter's tensors are views of one block per module, which safetensors refuses
        owned = {k: v.clone() for k, v in self._contiguous().items()}
        save_file(owned, str(directory / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
        (directory / PEFT_CONFIG_FILE).write_text(json.dumps(self.peft_config(), indent=2) + "\n")
        return directory

    @classmethod
    def load_peft(cls, directory: str | Path) -> "Adapter":
        directory = Path(directory)
        config = json.loads((directory / PEFT_CONFIG_FILE).read_text())
        return cls(
            tensors=load_file(str(directory / PEFT_WEIGHTS_FILE)),
            base_model=config.get("base_model_name_or_path") or "",
            target_modules=list(config["target_modules"]),
            rank=int(config["r"]),
            alpha=float(config["lora_alpha"]),
        )

    def to_bytes(self) -> bytes:
        """One blob: safetensors whose metadata holds the PEFT config, the task hash and a checksum.

        Written here rather than by ``safetensors.torch.save``: the checksum must sit in the header
        it covers, and the library's writer would copy the tensors three times (to numpy, into its
        blob, and again to splice the metadata in). Here the tensor bytes are joined once and hashed
        in one call, both of which release the GIL, so blobs of a batch serialise in parallel
        (``to_blobs``). ``safetensors.torch.load`` reads the result (tests check it).
        """
        tensors = self._contiguous()
        table: dict[str, Any] = {}
        views: list[memoryview] = []
        offset = 0
        for name in sorted(tensors):
            tensor = tensors[name]
            view = _bytes_view(tensor)
            table[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                           "data_offsets": [offset, offset + len(view)]}
            views.append(view)
            offset += len(view)
        payload = b"".join(views)
        info: dict[str, Any] = {"format": BLOB_FORMAT, "peft_config": self.peft_config(),
                                "task_hash": self.task_hash, "meta": self.meta}
        table_json = canonical_json(table)
        digest = _digest_start(info, table_json)
        digest.update(payload)
        info["sha256"] = digest.hexdigest()
        # the header is the tensor table plus the metadata: the table's JSON is reused, not encoded again
        metadata = json.dumps({"format": "pt", "hypergen": canonical_json(info)}, separators=(",", ":"))
        raw = f'{table_json[:-1]},"__metadata__":{metadata}}}'.encode()
        raw += b" " * (-len(raw) % 8)  # the format wants the tensor bytes 8-aligned
        return b"".join((struct.pack("<Q", len(raw)), raw, payload))

    @classmethod
    def from_bytes(cls, blob: bytes) -> "Adapter":
        """Parses and verifies a blob from ``to_bytes``; raises CorruptAdapterError on any damage."""
        info = verify_blob(blob)
        try:
            tensors = load(blob)
        except Exception as exc:
            raise CorruptAdapterError(f"adapter blob is damaged ({exc})", "adapter") from None
        config = info["peft_config"]
        return cls(
            tensors=tensors,
            base_model=config["base_model_name_or_path"],
            target_modules=list(config["target_modules"]),
            rank=int(config["r"]),
            alpha=float(config["lora_alpha"]),
            task_hash=info.get("task_hash"),
            meta=info.get("meta") or {},
        )

    def _contiguous(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}


def tensor_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Frobenius distance between two adapters' tensors, over ``a``'s keys: one number for how far
    a rounded adapter is from the exact one, or a task's adapter from the shared LoRA."""
    return sum(float((a[k] - b[k]).norm()) ** 2 for k in a) ** 0.5


def to_blobs(adapters: Sequence[Adapter]) -> list[tuple[bytes, float]]:
    """Each adapter's ``to_bytes()`` and the milliseconds it took, several at a time for a batch:
    joining and hashing a blob's tensor bytes release the GIL, so a batch of 16 serialises in
    0.7-0.8x the time on two cores."""

    def one(adapter: Adapter) -> tuple[bytes, float]:
        start = time.perf_counter()
        blob = adapter.to_bytes()
        return blob, (time.perf_counter() - start) * 1000

    if len(adapters) < 2:
        return [one(a) for a in adapters]
    return list(_serialisers().map(one, adapters))


@functools.cache
def _serialisers() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max(1, min(4, torch.get_num_threads())), thread_name_prefix="hypergen-blob")


def save_peft_blob(blob: bytes, directory: str | Path) -> Path:
    """Writes a ``to_bytes`` blob as a PEFT folder without touching its tensors.

    The blob is itself a safetensors file (its extra metadata is ignored by PEFT and vLLM), so
    a cache miss serialises the tensors once, in ``to_bytes``, and never again.
    """
    info = verify_blob(blob)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / PEFT_WEIGHTS_FILE).write_bytes(blob)
    (directory / PEFT_CONFIG_FILE).write_text(json.dumps(info["peft_config"], indent=2) + "\n")
    return directory


def verify_blob(blob: bytes) -> dict[str, Any]:
    """Checks a blob's format and checksum without building tensors; returns its metadata."""
    try:
        header = _read_header(blob)
        info = json.loads(header["__metadata__"]["hypergen"])
        if info.get("format") != BLOB_FORMAT:
            raise ValueError(f"format {info.get('format')!r}")
        if _digest(info, blob) != info["sha256"]:
            raise ValueError("checksum mismatch")
        info["peft_config"]["target_modules"]  # noqa: B018 - must be present
    except CorruptAdapterError:
        raise
    except Exception as exc:  # any parse failure means the bytes are not a sound adapter
        raise CorruptAdapterError(f"adapter blob is damaged ({exc})", "adapter") from None
    return info


def _read_header(blob: bytes) -> dict[str, Any]:
    if len(blob) < 8:
        raise CorruptAdapterError("adapter blob is truncated", "adapter")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8:
        raise CorruptAdapterError("adapter blob header is truncated", "adapter")
    return json.loads(blob[8 : 8 + n])


def _digest_start(info: dict[str, Any], table_json: str) -> "hashlib._Hash":
    """SHA-256 over the metadata (all but the checksum) and the tensor table (``canonical_json``);
    the tensor bytes follow."""
    digest = hashlib.sha256(canonical_json({k: v for k, v in info.items() if k != "sha256"}).encode())
    digest.update(table_json.encode())
    return digest


def _digest(info: dict[str, Any], blob: bytes) -> str:
    """The checksum of a blob as it lies: metadata, tensor table, tensor bytes."""
    header = _read_header(blob)
    header.pop("__metadata__", None)
    (n,) = struct.unpack("<Q", blob[:8])
    digest = _digest_start(info, canonical_json(header))
    digest.update(memoryview(blob)[8 + n :])  # no copy of the tensor bytes
    return digest.hexdigest()


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _bytes_view(tensor: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes, without a copy (numpy has no bfloat16: those go through uint8)."""
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.uint8)
    return memoryview(tensor.numpy()).cast("B")


@functools.lru_cache(maxsize=64)
def _peft_config_json(rank: int, alpha: float, target_modules: tuple[str, ...], base_model: str) -> str:
    """PEFT's LoraConfig as JSON, made once per spec: building a LoraConfig took a quarter of a
    millisecond, on every blob."""
    from peft import LoraConfig

    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0, bias="none",
        task_type="CAUSAL_LM", base_model_name_or_path=base_model, inference_mode=True,
    ).to_dict()
    config.pop("runtime_config", None)  # not saved by PEFT either
    config["target_modules"] = list(target_modules)  # PEFT holds a set; keep the given order
    return json.dumps(config, default=_json_default)


def _json_default(value: Any) -> Any:
    """Sets become sorted lists, as in PEFT's own saved configs."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON")
