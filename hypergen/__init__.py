"""hypergen: LoRA adapters generated on demand from a task instruction and a few demonstrations."""
from hypergen.adapter import Adapter
from hypergen.errors import CheckpointError, CorruptAdapterError, HypergenError, SpecError, TaskError
from hypergen.generator import HyperGenerator
from hypergen.refine import RefineError, refine
from hypergen.spec import LoraSpec, ModelDims
from hypergen.task import Demo, Task

__all__ = [
    "Adapter",
    "CheckpointError",
    "CorruptAdapterError",
    "Demo",
    "HyperGenerator",
    "HypergenError",
    "LoraSpec",
    "ModelDims",
    "RefineError",
    "SpecError",
    "Task",
    "TaskError",
    "refine",
]
__version__ = "0.1.0"
