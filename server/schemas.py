"""Request and response bodies. Field limits here are the API's contract (see openapi.yaml)."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from hypergen.compose import MAX_PARTS, METHODS as COMPOSE_METHODS
from hypergen.refine import MAX_EXAMPLES, MAX_STEPS, MIN_EXAMPLES
from hypergen.selection import MAX_POOL, METHODS as SELECT_METHODS
from hypergen.task import MAX_DEMO_FIELD_CHARS, MAX_DEMOS, MAX_INSTRUCTION_CHARS, TASK_HASH_PATTERN
from server.errors import ApiError

MAX_PROMPT_CHARS = 32_000
MAX_MESSAGES = 64
MAX_STOP = 4
MAX_STOP_CHARS = 64
MAX_INPUTS = 256
MAX_SEED = 2**32 - 1
MAX_HOLDOUT = 256
NOT_BLANK = r"\S"  # at least one non-whitespace character



def _integral(value: Any) -> Any:
    """JSON Schema's integer includes 1.0; the strict models otherwise take only true ints."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def json_int(**limits: Any) -> Any:
    """An int field type with bounds (the bounds first, so the schema shows them as such)."""
    return Annotated[int, Field(**limits), BeforeValidator(_integral)]


Seed = json_int(ge=0, le=MAX_SEED)
TokenCount = json_int(ge=1, description="At most HYPERGEN_MAX_TOKENS_LIMIT.")
AdapterId = Annotated[str, Field(pattern=TASK_HASH_PATTERN, description="64 lower-case hex characters (the task hash).")]
InputText = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
PromptText = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
StopText = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


def _given(name: str, json_type: str, value: Any = None) -> dict[str, Any]:
    """JSON Schema for 'the field is present and not null' (or, with value, equal to it)."""
    prop: dict[str, Any] = {"type": json_type} if value is None else {"const": value}
    return {"required": [name], "properties": {name: prop}}


# Request models are strict: 0 is not false, "3" is not 3, as the schema says (a contract fuzzer checks).
STRICT = ConfigDict(extra="forbid", strict=True)


class DemoIn(BaseModel):
    model_config = STRICT
    input: str = Field(max_length=MAX_DEMO_FIELD_CHARS)
    output: str = Field(max_length=MAX_DEMO_FIELD_CHARS, pattern=NOT_BLANK, description="Must not be blank.")


class TaskIn(BaseModel):
    """A task: an instruction and up to 32 input/output demonstrations (a blank instruction needs demos)."""

    model_config = ConfigDict(
        **STRICT,
        json_schema_extra={"anyOf": [
            {"required": ["instruction"], "properties": {"instruction": {"pattern": NOT_BLANK}}},
            {"required": ["demos"], "properties": {"demos": {"minItems": 1}}},
        ]},
    )
    instruction: str = Field(default="", max_length=MAX_INSTRUCTION_CHARS)
    demos: list[DemoIn] = Field(default_factory=list, max_length=MAX_DEMOS)


class SelectIn(BaseModel):
    model_config = STRICT
    k: json_int(ge=1, le=MAX_DEMOS) = Field(default=4, description="Demos per input (at most the pool's size, 32 with the task's own).")
    by: Literal[SELECT_METHODS] = Field(
        default="nearest",
        description="nearest: the k pool demos whose inputs are most like the input (cosine, task encoder); "
        "first: the pool's first k; random: one seeded k-subset for the whole request.")
    seed: Seed = 0


class PooledTaskIn(TaskIn):
    """A task for /generate: its own demos, and optionally a pool to pick more from, per input."""

    model_config = ConfigDict(
        **STRICT,
        json_schema_extra={"anyOf": [
            {"required": ["instruction"], "properties": {"instruction": {"pattern": NOT_BLANK}}},
            {"required": ["demos"], "properties": {"demos": {"minItems": 1}}},
            {"required": ["demo_pool"], "properties": {"demo_pool": {"type": "array"}}},
        ]},
    )
    demo_pool: list[DemoIn] | None = Field(
        default=None, min_length=1, max_length=MAX_POOL,
        description=f"Up to {MAX_POOL} labelled examples; each input is answered by the adapter of the task "
        "with the demos 'select' picks for it (inputs that pick the same share one adapter). Needs 'input' or 'inputs'.")
    select: SelectIn | None = Field(default=None, description="How demos are picked from demo_pool (default k=4, nearest).")


class AdapterOptions(BaseModel):
    model_config = STRICT
    warm: bool = Field(default=False, description="Also write the adapter for the engine now, so the first generate is faster.")
    public: bool = Field(default=False, description="With API keys: every key may use it (read-only); its id is the plain task hash.")


class AdapterRequest(TaskIn):
    options: AdapterOptions = Field(default_factory=AdapterOptions)


class WeightedAdapter(BaseModel):
    model_config = STRICT
    adapter_id: AdapterId
    weight: float = Field(default=1.0, ge=0, allow_inf_nan=False, description="A finite number >= 0.")


class ComposeRequest(BaseModel):
    """A weighted combination of adapters as a new adapter (see hypergen.compose for the methods)."""

    model_config = STRICT
    parts: list[WeightedAdapter] = Field(min_length=1, max_length=MAX_PARTS)
    method: Literal[COMPOSE_METHODS] = Field(
        default="linear",
        description="linear: PEFT's, keeps the rank (parts of one rank); cat: stacked, exact, rank = sum "
        "(at most the engine's HYPERGEN_MAX_LORA_RANK); svd: the exact sum cut to the largest part rank.",
    )
    instruction: str | None = Field(
        default=None, max_length=MAX_INSTRUCTION_CHARS, description="For prompts around 'input'; default: the first part's."
    )


class Composition(BaseModel):
    method: str
    parts: list[WeightedAdapter]


class AdapterLinks(BaseModel):
    self: str
    weights: str


class ErrorBody(BaseModel):
    code: str
    message: str
    field: str | None = None


class AdapterMeta(BaseModel):
    """What every cache tier keeps beside an adapter's blob, and what its responses show.

    An entry whose metadata does not parse as this (written by an older server) is a miss.
    """

    adapter_id: str
    instruction: str = Field(description="The task's instruction; prompts for 'input' are built around it.")
    base_model: str
    hypernetwork: str
    rank: int
    alpha: float
    target_modules: list[str]
    size_bytes: int
    num_demos: int
    created_at: str
    parent_id: str | None = Field(default=None, description="For a refined adapter: the adapter it was refined from.")
    composition: Composition | None = Field(default=None, description="For a composed adapter: its parts and method.")
    public: bool = Field(default=False, description="With API keys: readable by every key (only its owner may delete it).")
    owner: str | None = None  # the tenant that made it (with API keys); kept in the tiers, never shown


class AdapterOut(AdapterMeta):
    owner: SkipJsonSchema[None] = Field(default=None, exclude=True)
    prompt_template: str = Field(
        description="The prompt the adapter was trained on, rendered, with {input} where the input goes: "
        "substitute it and send it as a raw completion prompt to get the answers /generate gives for 'input'."
    )
    cached: bool
    cache_tier: Literal["memory", "redis"] | None = None
    links: AdapterLinks


class RefineRequest(BaseModel):
    """Fine-tune an adapter on your own examples (a job; see GET /jobs/{job_id})."""

    model_config = STRICT
    examples: list[DemoIn] = Field(min_length=MIN_EXAMPLES, max_length=MAX_EXAMPLES)
    steps: json_int(ge=1, le=MAX_STEPS) = 100
    lr: float = Field(default=1e-3, gt=0, le=1e-2)
    holdout: list[DemoIn] = Field(
        default_factory=list, max_length=MAX_HOLDOUT,
        description="Examples never trained on, scored before and after (exact match and ROUGE-L of greedy answers).",
    )


class HoldoutScores(BaseModel):
    exact_match: float
    rougeL: float


class JobLinks(BaseModel):
    self: str
    parent: str
    adapter: str | None = None


class JobOut(BaseModel):
    job_id: str
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    parent_id: str
    adapter_id: str = Field(description="The refined adapter's id: a hash of the parent, the examples and the parameters.")
    steps_done: int = 0
    steps_total: int
    loss: float | None = Field(default=None, description="The last step's training loss.")
    adapter: AdapterOut | None = None
    holdout: dict[str, HoldoutScores] | None = Field(default=None, description="'before' and 'after', when holdout examples were given.")
    error: ErrorBody | None = None
    created_at: str
    updated_at: str
    links: JobLinks


class Message(BaseModel):
    model_config = ConfigDict(strict=True)
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)


class SamplingIn(BaseModel):
    max_tokens: TokenCount = Field(default=128, description="At most HYPERGEN_MAX_TOKENS_LIMIT (also the default when that is lower).")
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: Annotated[list[StopText], Field(max_length=MAX_STOP)] | StopText | None = None
    seed: Seed | None = None
    stream: bool = False

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


SOURCES = ("prompt", "messages", "input", "inputs")


class GenerateRequest(SamplingIn):
    """Exactly one of prompt / messages / input / inputs; at most one of adapter_id / task / adapters.

    ``input``/``inputs`` are wrapped in the prompt the adapter was trained on (its instruction,
    the chat template); ``prompt``/``messages`` are sent as they are. Neither adapter_id nor task,
    or ``use_adapter: false``, means the base model.
    """

    model_config = ConfigDict(
        **STRICT,
        json_schema_extra={
            "oneOf": [_given("prompt", "string"), _given("messages", "array"), _given("input", "string"), _given("inputs", "array")],
            "not": {"anyOf": [
                {"required": ["adapter_id", "task"], "properties": {"adapter_id": {"type": "string"}, "task": {"type": "object"}}},
                {"required": ["adapter_id", "adapters"], "properties": {"adapter_id": {"type": "string"}, "adapters": {"type": "array"}}},
                {"required": ["task", "adapters"], "properties": {"task": {"type": "object"}, "adapters": {"type": "array"}}},
                {"required": ["inputs", "stream"], "properties": {"inputs": {"type": "array"}, "stream": {"const": True}}},
            ]},
        },
    )
    prompt: str | None = Field(default=None, min_length=1, max_length=MAX_PROMPT_CHARS, description="Raw text, tokenised as is.")
    messages: list[Message] | None = Field(default=None, min_length=1, max_length=MAX_MESSAGES, description="A raw chat.")
    input: InputText | None = Field(default=None, description="One input of the task; answered in the task's prompt.")
    inputs: list[InputText] | None = Field(
        default=None, min_length=1, max_length=MAX_INPUTS,
        description=f"Up to {MAX_INPUTS} inputs, generated together; answers come back in order. Not with stream.",
    )
    adapter_id: AdapterId | None = None
    task: PooledTaskIn | None = None
    adapters: list[WeightedAdapter] | None = Field(
        default=None, min_length=1, max_length=MAX_PARTS,
        description="Adapters combined on the fly (linear composition, cached like POST /adapters/compose).",
    )
    use_adapter: bool = Field(
        default=True,
        description="false: the same prompt on the base model (adapter_id or task still give the instruction).",
    )

    def check_shape(self) -> None:
        """The one-of rules (also in the schema), with the field in excess named."""
        given = [name for name in SOURCES if getattr(self, name) is not None]
        if len(given) != 1:
            field = given[1] if given else "input"
            raise ApiError(422, "invalid_request", "give exactly one of 'prompt', 'messages', 'input' or 'inputs'", field)
        named = [name for name in ("adapter_id", "task", "adapters") if getattr(self, name) is not None]
        if len(named) > 1:
            raise ApiError(422, "invalid_request", "give at most one of 'adapter_id', 'task' or 'adapters'", named[1])
        if self.inputs is not None and self.stream:
            raise ApiError(422, "invalid_request", "'inputs' cannot be streamed; stream one 'input' per request", "stream")
        if self.task is not None and self.task.select is not None and self.task.demo_pool is None:
            raise ApiError(422, "invalid_request", "'select' picks from 'demo_pool', which is missing", "task.select")
        if self.task is not None and self.task.demo_pool is not None and self.input is None and self.inputs is None:
            raise ApiError(422, "invalid_request", "a demo pool picks demos per input: send 'input' or 'inputs'", "task.demo_pool")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int = 0


class Timings(BaseModel):
    adapter_ms: float
    queue_ms: float = Field(description="Time the request waited in the engine's queue, from the engine's own timestamps; "
                            "0 where the engine does not report them (vLLM 0.11 has no per-request timestamps).")
    generate_ms: float


class GenerateOut(BaseModel):
    text: str
    adapter_id: str | None
    finish_reason: str | None
    usage: Usage
    timings: Timings


class InputResult(BaseModel):
    """One input's answer, or (``error`` set, the rest null) why it has none."""

    text: str | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    error: ErrorBody | None = None
    adapter_id: str | None = Field(default=None, description="The adapter that answered (per input with a demo pool).")


class GenerateManyOut(BaseModel):
    adapter_id: str | None = Field(description="The adapter that answered every input; null when they differ (demo pools) or none did.")
    results: list[InputResult]
    usage: Usage
    timings: Timings


class ErrorOut(BaseModel):
    error: ErrorBody


# --- OpenAI-compatible -------------------------------------------------------


class OpenAISampling(SamplingIn):
    model_config = ConfigDict(extra="ignore", strict=True)  # unknown OpenAI fields are accepted and ignored
    model: str
    max_tokens: TokenCount = 16
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    n: json_int(ge=1, le=1) = 1
    user: str | None = None


class CompletionRequest(OpenAISampling):
    prompt: PromptText | Annotated[list[PromptText], Field(min_length=1, max_length=1)] = Field(
        description="One prompt (a list of exactly one is accepted too)."
    )

    def text(self) -> str:
        return self.prompt[0] if isinstance(self.prompt, list) else self.prompt


class ChatCompletionRequest(OpenAISampling):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: TokenCount | None = None
    max_tokens: TokenCount = 128


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "hypergen"
    held_here: bool | None = Field(default=None, description="For an adapter: whether the answering replica holds it in memory.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def utc_now() -> str:
    """created_at / updated_at values: UTC, ISO 8601, to the second."""
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    """Token counts as both APIs report them (native and OpenAI share the shape)."""
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens)
