"""``POST /v1/chat/completions``: non-streaming JSON and SSE streaming.

Tools, ``tool_choice`` and ``response_format`` are planned in :mod:`mlxd.api.tools` (prompt,
grammar, reading calls back); this module only maps that onto the Chat Completions wire shape.

This module is the Chat Completions renderer and collector of :mod:`mlxd.api.pipeline`.
Everything that can be wrong with a request is found before the first byte is sent, so bad
input always gets an HTTP error; a failure after the stream started is sent as
``data: {"error": ...}`` (the OpenAI SDK raises on it).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from quart import Blueprint, Response, jsonify

from .. import __version__
from ..engine.loader import LoadedModel
from ..errors import BadRequest, MlxdError
from ..prompt import content_text
from . import pipeline, sse
from .context import AppState, RequestRecord, json_body, record, state
from .logprobs import Logprobs
from .params import MAX_CHOICES, SamplingFields, StopField, StreamOptions, normalize_stop, parse
from .pipeline import Choice, Done, Group, Piece, Reasoning, Sampling
from .routing import loaded_within, request_model, stream_when_loaded
from .tools import Call, CallArguments, CallStarted, Text, json_format

bp = Blueprint("chat", __name__)

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Role
    content: str | list[Any] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    @field_validator("tool_calls")
    @classmethod
    def _calls_are_functions(cls, v: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for call in v or []:
            fn = call.get("function")
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise ValueError("each tool call needs a 'function' object with a string 'name'")
            if not isinstance(fn.get("arguments", ""), str | dict):
                raise ValueError("a tool call's 'arguments' must be a JSON string")
        return v


class ChatRequest(SamplingFields, StopField):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def logprobs_k(self) -> int | None:
        """None without logprobs; else how many alternatives per token."""
        if self.top_logprobs is not None and not self.logprobs:
            raise BadRequest(
                "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value"
            )
        return (self.top_logprobs or 0) if self.logprobs else None


def to_template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages to the plain dicts chat templates expect."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        msg: dict[str, Any] = {
            "role": role,
            "content": content_text(m.content, param=f"messages[{i}].content"),
        }
        if m.tool_calls:
            msg["tool_calls"] = m.tool_calls
        if m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        if m.name:
            msg["name"] = m.name
        out.append(msg)
    return out


@bp.post("/v1/chat/completions")
async def chat_completions() -> Response:
    st = state()
    rec = record()
    req = parse(ChatRequest, await json_body())
    load = request_model(st, rec, req.model, keep_alive=req.keep_alive)
    keepalive = st.settings.server.sse_keepalive_seconds
    if req.stream and not await loaded_within(load, min(keepalive, 2.0)):
        body = stream_when_loaded(load, rec, lambda lm: _stream(st, rec, req, lm), keepalive)
        return pipeline.sse_response(body)
    lm = await load
    if req.stream:
        return pipeline.sse_response(await _stream(st, rec, req, lm))
    group = await _start(st, rec, req, lm)
    head = _Head(f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), group.model_id)
    choices = _Choices([_Message(bool(req.logprobs)) for _ in group.gens])
    done = await pipeline.collect(group, choices.take)
    return jsonify(head.completion(choices, done))


async def _start(st: AppState, rec: RequestRecord, req: ChatRequest, lm: LoadedModel) -> Group:
    return await pipeline.start_choices(
        st,
        rec,
        lm,
        to_template_messages(req.messages),
        tools=req.tools,
        tool_choice=req.tool_choice,
        parallel=req.parallel_tool_calls,
        fmt=json_format(req.response_format, param="response_format", flat=False),
        sampling=Sampling(
            requested_max=req.max_completion_tokens or req.max_tokens,
            max_param="max_completion_tokens" if req.max_completion_tokens else "max_tokens",
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            repetition_penalty=req.repetition_penalty,
            stop=normalize_stop(req.stop),
            logprobs=req.logprobs_k(),
        ),
        n=req.n,
    )


async def _stream(
    st: AppState, rec: RequestRecord, req: ChatRequest, lm: LoadedModel
) -> AsyncIterator[bytes]:
    """Start the generation and return its SSE frames (errors before the first frame raise,
    so they are HTTP errors when the model was loaded already)."""
    group = await _start(st, rec, req, lm)
    head = _Head(f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), group.model_id)
    keepalive = st.settings.server.sse_keepalive_seconds
    await pipeline.wait_first(group, min(keepalive, 2.0))
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    renderer = _ChunkRenderer(head, include_usage, len(group.gens))
    return pipeline.stream(group, renderer, keepalive)


def usage(done: Done) -> dict[str, Any]:
    fin = done.finished
    return {
        "prompt_tokens": fin.prompt_tokens,
        "completion_tokens": fin.completion_tokens,
        "total_tokens": fin.prompt_tokens + fin.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": fin.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": fin.reasoning_tokens},
    }


def _tool_calls(calls: tuple[Call, ...]) -> list[dict[str, Any]]:
    return [
        {
            "id": c.id,
            "type": "function",
            "function": {"name": c.name, "arguments": c.arguments},
        }
        for c in calls
    ]


FINGERPRINT = f"mlxd-{__version__}"


@dataclass(frozen=True)
class _Head:
    """What every chunk and the completion object repeat."""

    id: str
    created: int
    model: str

    def completion(self, choices: _Choices, done: Done) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": i,
                    "message": message.body(end),
                    "logprobs": message.logprobs(),
                    "finish_reason": end.finish_reason,
                }
                for i, (message, end) in enumerate(choices.finished())
            ],
            "usage": usage(done),
            "system_fingerprint": FINGERPRINT,
        }

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
            **extra,
        }


@dataclass
class _Message:
    """The collector: the assistant message of a non-streaming completion."""

    want_logprobs: bool = False
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tokens: list[dict[str, Any]] = field(default_factory=list)

    def take(self, piece: Piece) -> None:
        if isinstance(piece, Text):
            self.text.append(piece.text)
        elif isinstance(piece, Reasoning):
            self.reasoning.append(piece.text)
        elif isinstance(piece, Logprobs):
            self.tokens += [e.wire() for e in piece.entries]

    def logprobs(self) -> dict[str, Any] | None:
        return {"content": self.tokens, "refusal": None} if self.want_logprobs else None

    def body(self, done: Done) -> dict[str, Any]:
        text = "".join(self.text)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if done.calls:
            message["content"] = text or None
            message["tool_calls"] = _tool_calls(done.calls)
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        return message


@dataclass
class _Choices:
    """The collector for ``n`` choices: one message per choice, and each one's end."""

    messages: list[_Message]
    ends: dict[int, Done] = field(default_factory=dict)

    def take(self, choice: Choice) -> None:
        if isinstance(choice.item, Done):
            self.ends[choice.index] = choice.item
        else:
            self.messages[choice.index].take(choice.item)

    def finished(self) -> list[tuple[_Message, Done]]:
        return [(m, self.ends[i]) for i, m in enumerate(self.messages)]


@dataclass
class _ChunkRenderer:
    """The renderer: ``chat.completion.chunk`` frames. A call's first delta carries index,
    id, type, name and empty arguments; argument pieces follow in later deltas."""

    head: _Head
    include_usage: bool
    choices: int = 1
    #: Per choice: logprobs not sent yet; they go on that choice's next frame.
    pending: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    #: Per choice: the bytes around the text of a plain content frame (see :meth:`_text`).
    _around: dict[int, tuple[bytes, bytes]] = field(default_factory=dict, init=False, repr=False)

    def _text(self, index: int, text: str) -> bytes:
        """The frame of a content delta without logprobs: the same bytes as :meth:`_frame`
        makes (a test holds them equal), with only the text encoded per token. This is the
        frame of nearly every token; building and encoding the whole chunk each time was
        a large part of the event loop's work per token with many streams."""
        around = self._around.get(index)
        if around is None:
            mark = "\x00mark\x00"
            whole = self._frame(index, {"content": mark})
            before, after = whole.split(json.dumps(mark).encode())
            around = self._around[index] = (before, after)
        return around[0] + json.dumps(text).encode() + around[1]

    def _frame(self, index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
        tokens = self.pending.pop(index, None)
        logprobs = {"content": tokens, "refusal": None} if tokens else None
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        extra = {"usage": None} if self.include_usage else {}
        return sse.data_frame(self.head.chunk([choice], **extra))

    def opening(self) -> list[bytes]:
        return [self._frame(i, {"role": "assistant", "content": ""}) for i in range(self.choices)]

    def keepalive(self) -> bytes:
        return sse.KEEPALIVE

    def piece(self, piece: Choice) -> list[bytes]:
        i, item = piece.index, piece.item
        if isinstance(item, Logprobs):
            self.pending.setdefault(i, []).extend(e.wire() for e in item.entries)
            return []
        if isinstance(item, Done):
            frames = [self._frame(i, {})] if self.pending.get(i) else []
            return [*frames, self._frame(i, {}, item.finish_reason)]
        if isinstance(item, Text) and not self.pending.get(i):
            return [self._text(i, item.text)]
        return [self._frame(i, self._delta(item))]

    def _delta(self, piece: Piece) -> dict[str, Any]:
        if isinstance(piece, Text):
            return {"content": piece.text}
        if isinstance(piece, Reasoning):
            return {"reasoning_content": piece.text}
        if isinstance(piece, CallStarted):
            call = piece.call
            start = {
                "index": call.index,
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }
            return {"tool_calls": [start]}
        assert isinstance(piece, CallArguments)
        return {"tool_calls": [{"index": piece.call.index, "function": {"arguments": piece.delta}}]}

    async def done(self, done: Done) -> list[bytes]:
        frames = []
        if self.include_usage:
            frames.append(sse.data_frame(self.head.chunk([], usage=usage(done))))
        return [*frames, sse.DONE]

    def failed(self, error: MlxdError) -> list[bytes]:
        return [sse.data_frame(error.body())]

    def close(self) -> None:
        return None
