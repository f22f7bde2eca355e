"""Request and response bodies. Field limits here are the API's contract (see openapi.yaml)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hypergen.task import MAX_DEMO_FIELD_CHARS, MAX_DEMOS, MAX_INSTRUCTION_CHARS

MAX_PROMPT_CHARS = 32_000
MAX_MESSAGES = 64
MAX_STOP = 4


class DemoIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: str = Field(max_length=MAX_DEMO_FIELD_CHARS)
    output: str = Field(max_length=MAX_DEMO_FIELD_CHARS)


class TaskIn(BaseModel):
    """A task: an instruction and up to 32 input/output demonstrations."""

    model_config = ConfigDict(extra="forbid")
    instruction: str = Field(default="", max_length=MAX_INSTRUCTION_CHARS)
    demos: list[DemoIn] = Field(default_factory=list, max_length=MAX_DEMOS)


class AdapterOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    warm: bool = Field(default=False, description="Also write the adapter for the engine now, so the first generate is faster.")


class AdapterRequest(TaskIn):
    options: AdapterOptions = Field(default_factory=AdapterOptions)


class AdapterLinks(BaseModel):
    self: str
    weights: str


class AdapterOut(BaseModel):
    adapter_id: str
    cached: bool
    cache_tier: Literal["memory", "redis"] | None = None
    base_model: str
    hypernetwork: str
    rank: int
    alpha: float
    target_modules: list[str]
    size_bytes: int
    num_demos: int
    created_at: str
    links: AdapterLinks


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)


class SamplingIn(BaseModel):
    max_tokens: int = Field(default=128, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[str] | str | None = None
    seed: int | None = None
    stream: bool = False

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: list[str] | str | None) -> list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop
        if stops is not None and (len(stops) > MAX_STOP or any(not s or len(s) > 64 for s in stops)):
            raise ValueError(f"stop takes up to {MAX_STOP} non-empty strings of at most 64 characters")
        return stops

    def stop_list(self) -> list[str]:
        return list(self.stop or [])


class GenerateRequest(SamplingIn):
    """Exactly one of prompt / messages; at most one of adapter_id / task (neither = base model)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    messages: list[Message] | None = Field(default=None, min_length=1, max_length=MAX_MESSAGES)
    adapter_id: str | None = None
    task: TaskIn | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int = 0


class Timings(BaseModel):
    adapter_ms: float
    queue_ms: float
    generate_ms: float


class GenerateOut(BaseModel):
    text: str
    adapter_id: str | None
    finish_reason: str | None
    usage: Usage
    timings: Timings


class ErrorBody(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorOut(BaseModel):
    error: ErrorBody


# --- OpenAI-compatible -------------------------------------------------------


class OpenAISampling(SamplingIn):
    model_config = ConfigDict(extra="ignore")  # unknown OpenAI fields are accepted and ignored
    model: str
    max_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    n: int = Field(default=1, ge=1, le=1)
    user: str | None = None


class CompletionRequest(OpenAISampling):
    prompt: str | list[str] = Field(max_length=MAX_PROMPT_CHARS)

    @model_validator(mode="after")
    def _one_prompt(self) -> "CompletionRequest":
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise ValueError("prompt: exactly one prompt per request is supported")
            self.prompt = self.prompt[0]
        return self


class ChatCompletionRequest(OpenAISampling):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    max_tokens: int = Field(default=128, ge=1)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "hypergen"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def openai_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}
