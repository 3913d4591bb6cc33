"""``POST /v1/chat/completions``: non-streaming JSON and SSE streaming.

Tools, ``tool_choice`` and ``response_format`` are planned in :mod:`mlxd.api.tools` (prompt,
grammar, reading calls back); this module only maps that onto the Chat Completions wire shape.

Everything that can be wrong with a request is found before the first byte is sent, so bad
input always gets an HTTP error; a failure after the stream started is sent as
``data: {"error": ...}`` (the OpenAI SDK raises on it).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from quart import Blueprint, Response, jsonify

from ..engine.core import Delta, Event, Failed, Finished, Job
from ..errors import MlxdError
from ..prompt import content_text
from . import sse
from .app import RequestRecord, json_body, record, state
from .generation import Sampling, first_event, run_to_end, sse_response, start_job
from .params import SamplingFields, StopField, normalize_stop, parse
from .tools import CallArguments, CallStarted, OutputPlan, OutputReader, json_format

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


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(SamplingFields, StopField):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    logprobs: bool | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("logprobs are not supported by mlxd")
        return v


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
    lm = st.engine.require_model()
    rec.model = lm.id
    plan, job = await start_job(
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
        ),
    )
    completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        first = await first_event(st, job)
        rec.streaming = True
        keepalive = st.settings.server.sse_keepalive_seconds
        return sse_response(
            _stream(job, first, completion_id, created, lm.id, include_usage, rec, keepalive, plan)
        )
    return await _complete(job, completion_id, created, lm.id, plan)


def _usage(fin: Finished, reasoning_steps: int = 0) -> dict[str, Any]:
    # The engine does not count tokens inside <think> blocks; decoding steps that produced
    # only reasoning text are a close stand-in (held-back tag fragments merge a few).
    reasoning_tokens = fin.reasoning_tokens or min(reasoning_steps, fin.completion_tokens)
    return {
        "prompt_tokens": fin.prompt_tokens,
        "completion_tokens": fin.completion_tokens,
        "total_tokens": fin.prompt_tokens + fin.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": fin.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
    }


def _finish_reason(fin: Finished, reader: OutputReader) -> str:
    """``tool_calls`` when the model called tools and was not cut off."""
    return "tool_calls" if reader.calls and fin.finish_reason == "stop" else fin.finish_reason


def _tool_calls(reader: OutputReader) -> list[dict[str, Any]]:
    return [
        {
            "id": c.id,
            "type": "function",
            "function": {"name": c.name, "arguments": c.arguments},
        }
        for c in reader.calls
    ]


async def _complete(job: Job, cid: str, created: int, model_id: str, plan: OutputPlan) -> Response:
    st = state()
    rec = record()
    reader = plan.reader()
    reasoning: list[str] = []
    reasoning_steps = 0

    def take(event: Delta) -> None:
        nonlocal reasoning_steps
        reader.feed(event.content)
        reasoning.append(event.reasoning)
        reasoning_steps += bool(event.reasoning and not event.content)

    fin = await run_to_end(st, job, rec, take)
    reader.finish()
    text = "".join(reader.text)
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if reader.calls:
        message["content"] = text or None
        message["tool_calls"] = _tool_calls(reader)
    if any(reasoning):
        message["reasoning_content"] = "".join(reasoning)
    return jsonify(
        {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model_id,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": _finish_reason(fin, reader),
                }
            ],
            "usage": _usage(fin, reasoning_steps),
            "system_fingerprint": _fingerprint(),
        }
    )


def _fingerprint() -> str:
    from .. import __version__

    return f"mlxd-{__version__}"


async def _stream(
    job: Job,
    first: Event | None,
    cid: str,
    created: int,
    model_id: str,
    include_usage: bool,
    rec: RequestRecord,
    keepalive: float,
    plan: OutputPlan,
) -> AsyncIterator[bytes]:
    # Runs after the handler returned, outside the request context: everything it needs is
    # passed in.
    status = 200
    reader = plan.reader()
    reasoning_steps = 0

    def content_deltas(text: str | None, reasoning: str = "") -> list[dict[str, Any]]:
        """The deltas for ``text`` read as content and tool calls; ``None``: the end of the
        output (whatever the reader still held back). A call's first delta carries index,
        id, type, name and empty arguments; argument pieces follow in later deltas."""
        deltas: list[dict[str, Any]] = []
        current: dict[str, Any] = {}
        if reasoning:
            current["reasoning_content"] = reasoning
        read = reader.feed(text) if text is not None else reader.finish()
        for ev in read:
            if isinstance(ev, CallStarted):
                if current:
                    deltas.append(current)
                start = {
                    "index": ev.call.index,
                    "id": ev.call.id,
                    "type": "function",
                    "function": {"name": ev.call.name, "arguments": ""},
                }
                deltas.append({"tool_calls": [start]})
                current = {}
            elif isinstance(ev, CallArguments):
                calls = current.setdefault("tool_calls", [])
                if calls and calls[-1]["index"] == ev.call.index:
                    calls[-1]["function"]["arguments"] += ev.delta
                else:
                    calls.append({"index": ev.call.index, "function": {"arguments": ev.delta}})
            else:
                current["content"] = current.get("content", "") + ev.text
        if current:
            deltas.append(current)
        return deltas

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        payload: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_id,
            "system_fingerprint": _fingerprint(),
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            payload["usage"] = None
        return sse.data_frame(payload)

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for event in sse.events_after(job, first, keepalive):
            if event is None:
                yield sse.KEEPALIVE
            elif isinstance(event, Delta):
                if rec.first_token_at is None:
                    rec.first_token_at = time.perf_counter()
                reasoning_steps += bool(event.reasoning and not event.content)
                for delta in content_deltas(event.content, event.reasoning):
                    yield chunk(delta)
            elif isinstance(event, Failed):
                status = event.error.status
                rec.error = event.error.code or event.error.type
                yield sse.data_frame(event.error.body())
                return
            else:
                rec.completion_tokens = event.completion_tokens
                rec.cached_tokens = event.cached_tokens
                for delta in content_deltas(None):
                    yield chunk(delta)
                yield chunk({}, _finish_reason(event, reader))
                if include_usage:
                    payload = {
                        "id": cid,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model_id,
                        "system_fingerprint": _fingerprint(),
                        "choices": [],
                        "usage": _usage(event, reasoning_steps),
                    }
                    yield sse.data_frame(payload)
                yield sse.DONE
                return
    except asyncio.CancelledError:
        status = 499  # client closed the connection (nginx's convention)
        rec.error = "client_disconnected"
        raise
    except MlxdError as exc:  # defensive: never leave a stream without a terminal frame
        status = exc.status
        yield sse.data_frame(exc.body())
    finally:
        job.cancel()
        rec.finish(status)
