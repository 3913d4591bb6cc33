"""``POST /v1/completions``: the legacy text completion API (editor autocomplete plugins).

The prompt is used as it is: no chat template, no tools, ``<think>`` text left in the output.
A prompt is a string, a list of strings, a list of token ids or a list of such lists; each
prompt gets ``n`` choices, numbered prompt-major (``index = prompt * n + choice``), as OpenAI
does. This module is the completions renderer and collector of :mod:`mlxd.api.pipeline`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field, field_validator
from quart import Blueprint, Response, jsonify

from .. import __version__
from ..engine.core import Engine
from ..engine.loader import LoadedModel
from ..errors import BadRequest, MlxdError
from ..prompt import RawPrompts, token_lists
from . import pipeline, sse
from .context import json_body, record, state
from .logprobs import Entry, Logprobs, TokenText, legacy
from .params import MAX_CHOICES, SamplingFields, StopField, StreamOptions, normalize_stop, parse
from .pipeline import Choice, Done, Sampling
from .routing import model_for
from .tools import Text

bp = Blueprint("completions", __name__)

#: OpenAI's default for this API (Chat Completions defaults to the server's own).
DEFAULT_MAX_TOKENS = 16
MAX_PROMPTS = 64
FINGERPRINT = f"mlxd-{__version__}"

PromptField = RawPrompts


class CompletionRequest(SamplingFields, StopField):
    prompt: PromptField
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None
    stream_options: StreamOptions | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: PromptField) -> PromptField:
        if isinstance(v, list) and not v:
            raise ValueError("must be a string, a list of strings or a list of token ids")
        if isinstance(v, list) and isinstance(v[0], str | list) and len(v) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        return v


def _token_ids(lm: LoadedModel, value: RawPrompts) -> list[list[int]]:
    return token_lists(lm, value, param="prompt", room=1)


@bp.post("/v1/completions")
async def completions() -> Response:
    st = state()
    rec = record()
    req = parse(CompletionRequest, await json_body())
    if req.best_of is not None and req.best_of != req.n:
        raise BadRequest(
            "best_of other than n is not supported by mlxd", param="best_of", code="unsupported"
        )
    if req.suffix:
        raise BadRequest("suffix is not supported by mlxd", param="suffix", code="unsupported")
    lm = await model_for(st, rec, req.model, keep_alive=req.keep_alive)
    prompts = await asyncio.to_thread(_token_ids, lm, req.prompt)
    if len(prompts) * req.n > MAX_CHOICES:
        raise BadRequest(
            f"prompts x n is {len(prompts) * req.n}; at most {MAX_CHOICES} choices per request",
            param="n",
            code="invalid_value",
        )
    group = await pipeline.start_raw(
        st,
        rec,
        lm,
        prompts,
        n=req.n,
        sampling=Sampling(
            requested_max=req.max_tokens or DEFAULT_MAX_TOKENS,
            max_param="max_tokens",
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            repetition_penalty=req.repetition_penalty,
            stop=normalize_stop(req.stop),
            logprobs=req.logprobs,
        ),
    )
    echoes = [""] * len(group.gens)
    scored: list[list[Entry]] = [[] for _ in group.gens]
    if req.echo:
        texts = await asyncio.to_thread(lambda: [lm.tokenizer.decode(p) for p in prompts])
        echoes = [texts[i // req.n] for i in range(len(group.gens))]
        if req.logprobs is not None:
            try:
                prompt_entries = await _score(st.engine, lm, prompts, req.logprobs)
            except BaseException:
                group.cancel()
                raise
            scored = [prompt_entries[i // req.n] for i in range(len(group.gens))]
    head = _Head(f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), group.model_id)
    if not req.stream:
        texts_out = _Texts(echoes, req.logprobs is not None, scored)
        done = await pipeline.collect(group, texts_out.take)
        return jsonify(head.completion(texts_out, done))
    keepalive = st.settings.server.sse_keepalive_seconds
    await pipeline.wait_first(group, min(keepalive, 2.0))
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    renderer = _ChunkRenderer(head, echoes, include_usage, dict(enumerate(scored)))
    return pipeline.sse_response(pipeline.stream(group, renderer, keepalive))


async def _score(
    engine: Engine, lm: LoadedModel, prompts: list[list[int]], k: int
) -> list[list[Entry]]:
    """Every prompt's tokens with their logprobs (what ``echo`` with ``logprobs`` shows)."""
    texts = TokenText(lm.tokenizer)
    out = []
    for ids in prompts:
        scored = await asyncio.wrap_future(engine.score(lm, ids, k))
        out.append(await asyncio.to_thread(texts.prompt, ids, scored))
    return out


def usage(done: Done) -> dict[str, Any]:
    fin = done.finished
    return {
        "prompt_tokens": fin.prompt_tokens,
        "completion_tokens": fin.completion_tokens,
        "total_tokens": fin.prompt_tokens + fin.completion_tokens,
    }


@dataclass(frozen=True)
class _Head:
    """What every chunk and the completion object repeat."""

    id: str
    created: int
    model: str

    def body(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
            **extra,
        }

    def completion(self, texts: _Texts, done: Done) -> dict[str, Any]:
        choices = [
            {
                "text": "".join(parts),
                "index": i,
                "logprobs": legacy(texts.tokens[i], 0) if texts.want_logprobs else None,
                "finish_reason": texts.ends[i],
            }
            for i, parts in enumerate(texts.parts)
        ]
        return self.body(choices, usage=usage(done))


@dataclass
class _Texts:
    """The collector: every choice's text (after its echoed prompt) and finish reason."""

    echoes: list[str]
    want_logprobs: bool = False
    #: Per choice: its echoed prompt's entries first (echo with logprobs), then the output's.
    tokens: list[list[Entry]] = field(default_factory=list)
    parts: list[list[str]] = field(default_factory=list)
    ends: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.parts = [[echo] for echo in self.echoes]
        self.ends = [None] * len(self.echoes)
        self.tokens = [list(t) for t in self.tokens] or [[] for _ in self.echoes]

    def take(self, choice: Choice) -> None:
        if isinstance(choice.item, Logprobs):
            self.tokens[choice.index] += choice.item.entries
        elif isinstance(choice.item, Text):
            self.parts[choice.index].append(choice.item.text)
        elif isinstance(choice.item, Done):
            self.ends[choice.index] = choice.item.finish_reason


@dataclass
class _ChunkRenderer:
    """The renderer: ``text_completion`` chunks, one choice each; the echoed prompt is a
    choice's first chunk."""

    head: _Head
    echoes: list[str]
    include_usage: bool
    #: Per choice: logprob entries not sent yet, and the length of the text sent so far.
    pending: dict[int, list[Entry]] = field(default_factory=dict)
    sent: dict[int, int] = field(default_factory=dict)

    def _frame(self, index: int, text: str, finish: str | None = None) -> bytes:
        offset = self.sent.get(index, 0)
        self.sent[index] = offset + len(text)
        tokens = self.pending.pop(index, None)
        logprobs = legacy(tokens, offset) if tokens else None
        choice = {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}
        extra = {"usage": None} if self.include_usage else {}
        return sse.data_frame(self.head.body([choice], **extra))

    def opening(self) -> list[bytes]:
        return [self._frame(i, echo) for i, echo in enumerate(self.echoes) if echo]

    def keepalive(self) -> bytes:
        return sse.KEEPALIVE

    def piece(self, piece: Choice) -> list[bytes]:
        if isinstance(piece.item, Logprobs):
            self.pending.setdefault(piece.index, []).extend(piece.item.entries)
            return []
        if isinstance(piece.item, Done):
            return [self._frame(piece.index, "", piece.item.finish_reason)]
        if isinstance(piece.item, Text):
            return [self._frame(piece.index, piece.item.text)]
        return []

    async def done(self, done: Done) -> list[bytes]:
        frames = []
        if self.include_usage:
            frames.append(sse.data_frame(self.head.body([], usage=usage(done))))
        return [*frames, sse.DONE]

    def failed(self, error: MlxdError) -> list[bytes]:
        return [sse.data_frame(error.body())]

    def close(self) -> None:
        return None
