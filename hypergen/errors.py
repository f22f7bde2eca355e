"""Errors a user can cause and fix. Each one names the field at fault so an API can report it."""
from __future__ import annotations


class HypergenError(ValueError):
    """Base of every user-facing error; ``field`` is a dotted path such as ``demos.2.output``."""

    code = "invalid_request"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class TaskError(HypergenError):
    code = "invalid_task"


class SpecError(HypergenError):
    code = "invalid_lora_spec"


class CheckpointError(HypergenError):
    code = "checkpoint_mismatch"


class CorruptAdapterError(HypergenError):
    code = "corrupt_adapter"
