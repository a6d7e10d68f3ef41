"""Request/response bodies (pydantic v2). Type checks live here; limits that depend on
the server's configuration (texts per request, characters per text, the model's
smallest budget) are checked by the routes, which know the configuration."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
)

_FRACTION_SCHEMA = {"type": "number", "exclusiveMinimum": 0, "maximum": 1}
MAX_MS = 60_000.0  # a time budget beyond a minute per text is a mistake, not a budget
BUDGET_SCHEMA = {
    "description": (
        "Fraction of dense FLOPs in (0, 1] (1 = dense): one number for every text, a list with one "
        "number per text, {'mean': m, 'cap': c} (the model chooses per text, mean m over the request; "
        "needs a calibration saved with the gates), or {'ms': t} (at most t milliseconds per text at "
        "batch 1 as this machine's cost table predicts; needs `dynprune bench calibrate`). "
        "Default: the model's default budget."
    ),
    "anyOf": [
        _FRACTION_SCHEMA,
        {"type": "array", "items": _FRACTION_SCHEMA, "minItems": 1},
        {
            "type": "object",
            "properties": {"mean": _FRACTION_SCHEMA, "cap": _FRACTION_SCHEMA},
            "required": ["mean"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "properties": {"ms": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_MS}},
            "required": ["ms"],
            "additionalProperties": False,
        },
        {"type": "null"},
    ],
}


class MeanBudget(BaseModel):
    """Mean-budget mode: the router decides how much per text, the mean over the request is ``mean``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    mean: float
    cap: float | None = None


class TimeBudget(BaseModel):
    """Time-budget mode: at most ``ms`` milliseconds per text (batch-1 prediction of the cost table)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    ms: float


def fraction(value: Any, where: str) -> float:
    """One budget: a JSON number (not a boolean, not a string) in (0, 1], finite."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where} must be a number in (0, 1], got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or not (0.0 < value <= 1.0):
        raise ValueError(f"{where} must be a fraction of dense FLOPs in (0, 1] (1 = dense), got {value!r}")
    return float(value)


def parse_budget(value: Any) -> float | tuple[float, ...] | MeanBudget | TimeBudget | None:
    """The ``budget`` field: None, a number, a non-empty list of numbers, {mean, cap} or {ms}."""
    if value is None:
        return None
    if isinstance(value, list):
        if not value:
            raise ValueError("budget list is empty; give one budget per text (or one number for all)")
        return tuple(fraction(v, f"budget[{i}]") for i, v in enumerate(value))
    if isinstance(value, dict) and "ms" in value:
        if set(value) != {"ms"}:
            raise ValueError("a time budget is {'ms': t} alone (no 'mean' or 'cap' beside it)")
        ms = value["ms"]
        if isinstance(ms, bool) or not isinstance(ms, int | float):
            raise ValueError(f"budget.ms must be a number of milliseconds, got {type(ms).__name__} {ms!r}")
        if not math.isfinite(ms) or not (0.0 < ms <= MAX_MS):
            raise ValueError(f"budget.ms must be in (0, {MAX_MS:g}] milliseconds, got {ms!r}")
        return TimeBudget(ms=float(ms))
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"mean", "cap"})
        if unknown:
            raise ValueError(
                f"budget object has unknown keys {unknown}; allowed: 'mean' and optional 'cap', or 'ms' alone"
            )
        if "mean" not in value:
            raise ValueError("budget object needs 'mean' (and optionally 'cap')")
        mean = fraction(value["mean"], "budget.mean")
        cap = None if value.get("cap") is None else fraction(value["cap"], "budget.cap")
        if cap is not None and cap < mean:
            raise ValueError(f"budget.cap ({cap}) must be >= budget.mean ({mean})")
        return MeanBudget(mean=mean, cap=cap)
    return fraction(value, "budget")


Budget = Annotated[Any, BeforeValidator(parse_budget), WithJsonSchema(BUDGET_SCHEMA)]


#: what check_text refuses: lone surrogates and control characters (Unicode category Cc, which
#: is exactly U+0000-U+001F and U+007F-U+009F, a stable set) other than tab, newline and CR
_REFUSED = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def check_text(text: str, what: str = "text") -> str:
    """Reject what no tokenizer should see: empty/blank texts, lone surrogates, control characters.
    (One regex search: a per-character loop cost ~20 % of a request's handling in the server.)"""
    where = what
    if not text.strip():
        raise ValueError(f"{where} is empty or only whitespace")
    bad = _REFUSED.search(text)
    if bad is not None:
        pos, code = bad.start(), ord(bad.group())
        if 0xD800 <= code <= 0xDFFF:
            raise ValueError(
                f"{where} contains a lone surrogate U+{code:04X} at character {pos} (not valid Unicode)"
            )
        raise ValueError(f"{where} contains control character U+{code:04X} at character {pos}")
    return text


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"texts": ["a gripping, funny film", "dull"], "budget": [0.5, 0.25]}]
        },
    )
    texts: list[Annotated[str, Field(strict=True), AfterValidator(check_text)]] = Field(
        min_length=1, description="texts to classify"
    )
    budget: Budget = None


class ClassifyItem(BaseModel):
    label: str
    label_id: int
    scores: list[float] = Field(description="softmax probabilities, one per label")
    budget: float | None = Field(description="the budget this text ran at (None: mean-budget mode)")
    flops_ratio: float = Field(description="executed FLOPs / dense FLOPs for this text")
    tokens: int = Field(description="tokens of this text after truncation")
    padded_len: int = Field(description="padded length of the forward it ran in (routing depends on it)")
    truncated: bool = Field(description="the text filled max_length tokens (it was, or may have been, cut)")


class ClassifyResponse(BaseModel):
    model: str
    items: list[ClassifyItem]
    batch_size: int = Field(description="texts in the largest forward this request's texts ran in")


class ErrorBody(BaseModel):
    type: str
    field: str | None
    message: str
    details: list[dict[str, Any]] = []


class ErrorResponse(BaseModel):
    error: ErrorBody


# -- generation ------------------------------------------------------------------------
MAX_NEW_TOKENS = 4096
_Temperature = Annotated[float, Field(ge=0.0, le=10.0, allow_inf_nan=False, strict=True)]
_TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False, strict=True)]
_NewTokens = Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS, strict=True)]
_One = Annotated[int, Field(strict=True)]
_Seed = Annotated[int, Field(ge=0, lt=2**63, strict=True)]


def no_beams(value: int, field: str) -> int:
    if value != 1:
        raise ValueError(
            f"{field} = {value}: beam search is not supported by gated generation (its KV cache holds "
            "per-sequence gates and cannot be re-indexed); use greedy (temperature 0) or sampling"
        )
    return value


class GenerateRequest(BaseModel):
    """``budget``: one number in (0, 1] for the prompt (default: the model's default budget)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"prompt": "In the beginning", "max_new_tokens": 32, "temperature": 0, "budget": 0.6}
            ]
        },
    )
    prompt: Annotated[str, Field(strict=True)]
    max_new_tokens: _NewTokens = 64
    temperature: _Temperature = Field(1.0, description="0 = greedy")
    top_p: _TopP = 1.0
    top_k: Annotated[int, Field(ge=0, strict=True)] = Field(0, description="0 = off")
    seed: _Seed | None = Field(None, description="reproducible sampling (the request runs unbatched)")
    num_beams: _One = 1
    stream: Annotated[bool, Field(strict=True)] = False
    budget: Budget = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, prompt: str) -> str:
        return check_text(prompt, "prompt")

    @field_validator("num_beams")
    @classmethod
    def _beams(cls, value: int) -> int:
        return no_beams(value, "num_beams")


class CompletionRequest(BaseModel):
    """OpenAI-style /v1/completions (``budget`` is dynprune's extension)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: Annotated[str, Field(strict=True)]
    max_tokens: _NewTokens = 16
    temperature: _Temperature = 1.0
    top_p: _TopP = 1.0
    n: Annotated[int, Field(ge=1, le=1, strict=True)] = 1
    best_of: _One = 1
    stream: Annotated[bool, Field(strict=True)] = False
    seed: _Seed | None = None
    budget: Budget = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, prompt: str) -> str:
        return check_text(prompt, "prompt")

    @field_validator("best_of")
    @classmethod
    def _beams(cls, value: int) -> int:
        return no_beams(value, "best_of")


class GenerateResponse(BaseModel):
    model: str
    text: str
    token_ids: list[int]
    finish_reason: str = Field(description="'stop' (end-of-sequence token) or 'length' (max_new_tokens)")
    prompt_tokens: int
    completion_tokens: int
    budget: float
    flops_ratio: float = Field(
        description="executed FLOPs / dense FLOPs of the prefill, where the gates were chosen "
        "(they are held for every decode step)"
    )
    padded_len: int = Field(description="left-padded prompt length of the batch it ran in")
    batch_size: int = Field(description="sequences in the generate call it ran in")
