"""Request validation shared by both APIs: pydantic models to OpenAI 400s, sampling params.

Sampling values at the edges of what the engine can compute are settled here, never passed
through (the sampler works in float32, where 1e-300 is 0 and a division by it is inf):

* ``seed``: any 64-bit integer, signed or unsigned (``-2**63 .. 2**64-1``); negative seeds
  are mapped into MLX's unsigned range by two's complement (``-1`` is ``2**64-1``). Outside
  that range: 400.
* ``temperature`` below :data:`GREEDY_BELOW` is greedy decoding (temperature 0), and so is
  ``top_p`` below it (only the most likely token survives such a nucleus).
* ``repetition_penalty`` must lie in ``[0.01, 10]`` (400 otherwise): a penalty near 0
  divides logits by ~0.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..config import ModelSettings, Settings
from ..engine.core import GenerationParams, LogitsProcessor
from ..engine.loader import LoadedModel
from ..errors import BadRequest, ContextLengthExceeded

M = TypeVar("M", bound=BaseModel)

#: Temperatures and top_p values below this decode greedily (see the module docstring).
GREEDY_BELOW = 1e-6

#: The most choices one request may ask for (Chat ``n``; completions: prompts x ``n``). Each
#: choice is a job: a bound keeps one request from filling the queue.
MAX_CHOICES = 16


class SamplingFields(BaseModel):
    """Fields both APIs share. Unknown fields are ignored, as OpenAI clients expect."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    repetition_penalty: float | None = Field(None, ge=0.01, le=10)
    stream: bool = False
    #: As in Ollama: how long the model stays loaded when idle, from now on (seconds or "5m").
    keep_alive: float | str | None = None

    @field_validator("seed")
    @classmethod
    def _unsigned_seed(cls, v: int | None) -> int | None:
        return None if v is None else v % 2**64  # -1 -> 2**64-1: MLX keys are uint64


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


def parse(model: type[M], body: dict[str, Any]) -> M:
    """Validate ``body``; the first problem becomes a 400 naming the parameter."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = _param(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        detail = f"Invalid value for '{param}': {msg}" if param else msg
        if got is not None and err["type"] != "missing" and len(repr(got)) < 80:
            detail += f" (got {got!r})"
        raise BadRequest(detail, param=param or None, code="invalid_value") from None


def _param(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[str]", "function-after", "function-plain") or "[" in str(part):
            continue  # pydantic's union branch labels are not parameter names
        else:
            out += f".{part}" if out else str(part)
    return out


def normalize_stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


class StopField(BaseModel):
    stop: str | list[str] | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_16(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 16:
            raise ValueError("at most 16 stop sequences are supported")
        return v


def generation_params(
    settings: Settings,
    lm: LoadedModel,
    prompt_len: int,
    *,
    requested_max: int | None,
    temperature: float | None,
    top_p: float | None,
    seed: int | None = None,
    repetition_penalty: float | None = None,
    stop: tuple[str, ...] = (),
    max_param: str = "max_tokens",
    top_k: int | None = None,
    logits_processors: tuple[LogitsProcessor, ...] = (),
    defaults: ModelSettings | None = None,
) -> GenerationParams:
    """Defaults from the model's entry (``defaults``; else [model]), limits from [server],
    and the context-length check.

    A prompt that leaves no room in the context is a 400 ``context_length_exceeded`` before
    anything is generated; otherwise the completion budget is cut to what fits.
    """
    if requested_max is not None and requested_max > settings.server.max_tokens_limit:
        raise BadRequest(
            f"{max_param} {requested_max} is above this server's limit "
            f"({settings.server.max_tokens_limit}; server.max_tokens_limit)",
            param=max_param,
            code="invalid_value",
        )
    room = lm.context_length - prompt_len
    if room <= 0:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {lm.context_length} tokens. However, your "
            f"messages resulted in {prompt_len} tokens. Please reduce the length of the messages.",
            param="messages",
        )
    entry = defaults or settings.model
    budget = requested_max if requested_max is not None else entry.max_tokens
    temperature = entry.temperature if temperature is None else temperature
    top_p = entry.top_p if top_p is None else top_p
    # Values float32 cannot tell from 0 mean "the most likely token" (every API comes here).
    if temperature < GREEDY_BELOW:
        temperature = 0.0
    if top_p < GREEDY_BELOW:
        temperature, top_p = 0.0, 1.0
    return GenerationParams(
        max_tokens=max(1, min(budget, room)),
        temperature=temperature,
        top_p=top_p,
        stop=stop,
        seed=seed,
        repetition_penalty=repetition_penalty,
        top_k=top_k or 0,
        timeout=settings.server.request_timeout_seconds,
        logits_processors=logits_processors,
    )
