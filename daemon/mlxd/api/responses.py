"""The OpenAI Responses API: ``POST /v1/responses`` (JSON and SSE), retrieve, delete, input items.

A request's prompt is: the current request's ``instructions`` (as the system message; those of
earlier turns are not carried over, as the API defines), then for every stored ancestor of
``previous_response_id`` (root first) its input items and its output, then this request's
input items. Stored turns live in :mod:`mlxd.conversations.store`.

Everything that can be wrong with a request is found before the first byte is sent. A
streaming client that disconnects mid-stream cancels the generation and nothing is stored
(the response id it saw never becomes retrievable). Output items are built in one place
(:class:`_Output`): reasoning items (``<think>`` text, with ``[model] reasoning =
"separate"``), the message item and function-call items, in the order the model produced them;
the same code yields the streaming events, so streamed and stored responses agree.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, field_validator
from quart import Blueprint, Response, jsonify, request

from ..conversations.store import Chain, Store, StoredResponse
from ..engine.core import Delta, Event, Failed, Finished, GenerationParams, Job
from ..errors import BadRequest, MlxdError, ModelUnavailable, NotFound
from ..prompt import content_text
from . import sse
from .app import RequestRecord, json_body, record, state
from .generation import Sampling, first_event, run_to_end, sse_response, start_job
from .params import SamplingFields, parse
from .tools import (
    Call,
    CallArguments,
    CallStarted,
    OutputPlan,
    OutputReader,
    Text,
    json_format,
)

bp = Blueprint("responses", __name__)

_MESSAGE_ROLES = ("user", "assistant", "system", "developer")


class ResponsesRequest(SamplingFields):
    input: str | list[Any]
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool = True
    max_output_tokens: int | None = Field(None, ge=1)
    metadata: dict[str, str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    truncation: str | None = None
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _not_empty(cls, v: str | list[Any]) -> str | list[Any]:
        if isinstance(v, list) and not v:
            raise ValueError("must be a string or a non-empty list of input items")
        return v

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None and (
            len(v) > 16 or any(len(k) > 64 or len(s) > 512 for k, s in v.items())
        ):
            raise ValueError("at most 16 keys of up to 64 characters, values up to 512 characters")
        return v


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# -- input items -----------------------------------------------------------------------------
def normalize_input(raw: str | list[Any]) -> list[dict[str, Any]]:
    """The request's input as stored items, each with an id (``GET .../input_items`` returns them).

    Messages get content parts (``input_text``; ``output_text`` for assistant messages);
    ``function_call`` / ``function_call_output`` items are kept; replayed ``reasoning`` items are
    accepted and dropped (they do not reach the prompt).
    """
    if isinstance(raw, str):
        return [_message_item("user", [{"type": "input_text", "text": raw}], _new_id("msg"))]
    items: list[dict[str, Any]] = []
    for i, item in enumerate(raw):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise BadRequest("each input item must be an object", param=param, code="invalid_value")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in _MESSAGE_ROLES:
                raise BadRequest(
                    f"message role must be one of {', '.join(_MESSAGE_ROLES)} (got {role!r})",
                    param=f"{param}.role",
                    code="invalid_value",
                )
            content = item.get("content")
            text_type = "output_text" if role == "assistant" else "input_text"
            if isinstance(content, str):
                parts: list[dict[str, Any]] = [{"type": text_type, "text": content}]
            elif isinstance(content, list):
                content_text(content, param=f"{param}.content")  # validates the parts
                parts = [
                    {"type": text_type, "text": p} if isinstance(p, str) else dict(p)
                    for p in content
                ]
            else:
                raise BadRequest(
                    "message content must be a string or a list of parts",
                    param=f"{param}.content",
                    code="invalid_value",
                )
            if role == "assistant":
                for p in parts:
                    p.setdefault("annotations", [])
            items.append(_message_item(role, parts, str(item.get("id") or _new_id("msg"))))
        elif kind == "function_call":
            for key in ("call_id", "name", "arguments"):
                if not isinstance(item.get(key), str):
                    raise BadRequest(
                        f"a function_call item needs a string '{key}'",
                        param=f"{param}.{key}",
                        code="invalid_value",
                    )
            items.append(
                {
                    "id": str(item.get("id") or _new_id("fc")),
                    "type": "function_call",
                    "call_id": item["call_id"],
                    "name": item["name"],
                    "arguments": item["arguments"],
                    "status": "completed",
                }
            )
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(item.get("call_id"), str):
                raise BadRequest(
                    "a function_call_output item needs a string 'call_id'",
                    param=f"{param}.call_id",
                    code="invalid_value",
                )
            if not isinstance(output, str):
                output = content_text(output, param=f"{param}.output")
            items.append(
                {
                    "id": str(item.get("id") or _new_id("fco")),
                    "type": "function_call_output",
                    "call_id": item["call_id"],
                    "output": output,
                    "status": "completed",
                }
            )
        elif kind == "reasoning":
            continue
        else:
            raise BadRequest(
                f"input item type {kind!r} is not supported by mlxd (message, function_call, "
                "function_call_output)",
                param=f"{param}.type",
                code="unsupported_value",
            )
    if not items:
        raise BadRequest("input has no message or function call items", param="input")
    return items


def _message_item(role: str, parts: list[dict[str, Any]], item_id: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "role": role, "content": parts, "status": "completed"}


def items_to_messages(items: list[dict[str, Any]], out: list[dict[str, Any]]) -> None:
    """Append stored input or output items to ``out`` as chat-template messages."""
    for item in items:
        kind = item.get("type")
        if kind == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            text = content_text(item.get("content"), param="input")
            out.append({"role": role, "content": text})
        elif kind == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            elif last is not None and last["role"] == "assistant":
                last["tool_calls"] = [call]
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
        # reasoning items do not reach the prompt


def build_messages(
    instructions: str | None, history: list[StoredResponse], items: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The whole prompt as messages: current instructions, the stored chain, the new input."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    for turn in history:
        items_to_messages(turn.input_items, messages)
        items_to_messages(turn.body.get("output") or [], messages)
    items_to_messages(items, messages)
    return messages


# -- the Response object ----------------------------------------------------------------------
OutputEvent = tuple[str, dict[str, Any]]  # (event type, payload without type/sequence)


@dataclass
class _Item:
    kind: str  # "reasoning" | "message" | "function_call"
    id: str
    text: list[str] = field(default_factory=list)
    call: Call | None = None
    done: bool = False


@dataclass
class _Output:
    """The output items of one response; the only place that builds them.

    Fed with the engine's reasoning and content text, it keeps the items in output order and
    returns the streaming events each step causes (the non-streaming path ignores them). An
    item is closed when the next one opens; at the end a response without calls always has a
    message item.
    """

    reader: OutputReader
    entries: list[_Item] = field(default_factory=list)
    reasoning_steps: int = 0

    def reasoning(self, text: str) -> list[OutputEvent]:
        if not text:
            return []
        events = self._open("reasoning")
        i = len(self.entries) - 1
        self.entries[i].text.append(text)
        loc = {"item_id": self.entries[i].id, "output_index": i, "content_index": 0}
        return [*events, ("response.reasoning_text.delta", {**loc, "delta": text})]

    def content(self, text: str) -> list[OutputEvent]:
        return self._read(self.reader.feed(text))

    def finish(self, status: str) -> list[OutputEvent]:
        events = self._read(self.reader.finish())
        if not any(e.kind != "reasoning" for e in self.entries):
            events += self._open("message")
        return events + self._close(status)

    def items(self, status: str) -> list[dict[str, Any]]:
        return [self._snapshot(e, status) for e in self.entries]

    def _read(self, read: list[Any]) -> list[OutputEvent]:
        events: list[OutputEvent] = []
        for ev in read:
            if isinstance(ev, Text):
                events += self._open("message")
                i = len(self.entries) - 1
                self.entries[i].text.append(ev.text)
                loc = {"item_id": self.entries[i].id, "output_index": i, "content_index": 0}
                events.append(
                    ("response.output_text.delta", {**loc, "delta": ev.text, "logprobs": []})
                )
            elif isinstance(ev, CallStarted):
                events += self._open("function_call", ev.call)
            elif isinstance(ev, CallArguments):
                i = len(self.entries) - 1
                loc = {"item_id": self.entries[i].id, "output_index": i}
                events.append(
                    ("response.function_call_arguments.delta", {**loc, "delta": ev.delta})
                )
        return events

    def _open(self, kind: str, call: Call | None = None) -> list[OutputEvent]:
        last = self.entries[-1] if self.entries else None
        if last is not None and not last.done and last.kind == kind and call is None:
            return []
        events = self._close("completed")
        prefix = {"reasoning": "rs", "message": "msg", "function_call": "fc"}[kind]
        entry = _Item(kind, _new_id(prefix), call=call)
        self.entries.append(entry)
        i = len(self.entries) - 1
        events.append(
            (
                "response.output_item.added",
                {"output_index": i, "item": self._snapshot(entry, "in_progress")},
            )
        )
        if kind != "function_call":
            loc = {"item_id": entry.id, "output_index": i, "content_index": 0}
            events.append(("response.content_part.added", {**loc, "part": self._part(entry)}))
        return events

    def _close(self, status: str) -> list[OutputEvent]:
        """Events that end the open item (if any)."""
        if not self.entries or self.entries[-1].done:
            return []
        i = len(self.entries) - 1
        entry = self.entries[i]
        entry.done = True
        loc: dict[str, Any] = {"item_id": entry.id, "output_index": i}
        events: list[OutputEvent] = []
        text = "".join(entry.text)
        if entry.kind == "reasoning":
            loc["content_index"] = 0
            events.append(("response.reasoning_text.done", {**loc, "text": text}))
            events.append(("response.content_part.done", {**loc, "part": self._part(entry)}))
        elif entry.kind == "message":
            loc["content_index"] = 0
            events.append(("response.output_text.done", {**loc, "text": text, "logprobs": []}))
            events.append(("response.content_part.done", {**loc, "part": self._part(entry)}))
        else:
            assert entry.call is not None
            events.append(
                (
                    "response.function_call_arguments.done",
                    {**loc, "name": entry.call.name, "arguments": entry.call.arguments},
                )
            )
        events.append(
            (
                "response.output_item.done",
                {"output_index": i, "item": self._snapshot(entry, status)},
            )
        )
        return events

    @staticmethod
    def _part(entry: _Item) -> dict[str, Any]:
        text = "".join(entry.text)
        if entry.kind == "reasoning":
            return {"type": "reasoning_text", "text": text}
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _snapshot(self, entry: _Item, status: str) -> dict[str, Any]:
        if entry.kind == "function_call":
            assert entry.call is not None
            return {
                "id": entry.id,
                "type": "function_call",
                "call_id": entry.call.id,
                "name": entry.call.name,
                "arguments": "" if status == "in_progress" else entry.call.arguments,
                "status": status,
            }
        content = [] if status == "in_progress" else [self._part(entry)]
        if entry.kind == "reasoning":
            return {
                "id": entry.id,
                "type": "reasoning",
                "summary": [],
                "content": content,
                "status": status,
            }
        return {
            "id": entry.id,
            "type": "message",
            "role": "assistant",
            "status": status,
            "content": content,
        }


@dataclass
class _Turn:
    """What the response object repeats from the request, fixed before generation starts."""

    id: str
    created_at: int
    model: str
    req: ResponsesRequest
    params: GenerationParams

    def body(
        self,
        status: str,
        output: list[dict[str, Any]],
        fin: Finished | None = None,
        error: MlxdError | None = None,
        reasoning_steps: int = 0,
    ) -> dict[str, Any]:
        req = self.req
        usage = None
        if fin is not None:
            # The engine does not count tokens inside <think> blocks; decoding steps that
            # produced only reasoning text are a close stand-in.
            reasoning_tokens = fin.reasoning_tokens or min(reasoning_steps, fin.completion_tokens)
            usage = {
                "input_tokens": fin.prompt_tokens,
                "input_tokens_details": {
                    "cached_tokens": fin.cached_tokens,
                    "cache_write_tokens": 0,
                },
                "output_tokens": fin.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
                "total_tokens": fin.prompt_tokens + fin.completion_tokens,
            }
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "completed_at": int(time.time()) if status == "completed" else None,
            "status": status,
            "background": False,
            "error": {"code": error.code or "server_error", "message": error.message}
            if error is not None
            else None,
            "incomplete_details": {"reason": "max_output_tokens"}
            if status == "incomplete"
            else None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": True
            if req.parallel_tool_calls is None
            else req.parallel_tool_calls,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "store": req.store,
            "temperature": self.params.temperature,
            "top_p": self.params.top_p,
            "text": {"format": (req.text or {}).get("format") or {"type": "text"}},
            "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
            "tools": req.tools or [],
            "truncation": req.truncation or "disabled",
            "usage": usage,
            "metadata": req.metadata or {},
            "user": req.user,
        }


def _status(fin: Finished) -> str:
    return "incomplete" if fin.finish_reason == "length" else "completed"


def _store() -> Store:
    store: Store | None = state().store
    if store is None:
        raise ModelUnavailable("the conversation store is not open yet; retry", retry_after=1)
    return store


async def _save(
    store: Store, turn: _Turn, chain: Chain, items: list[dict[str, Any]], body: dict[str, Any]
) -> None:
    if not turn.req.store:
        return
    stored = StoredResponse(
        id=turn.id,
        conversation_id=chain.conversation_id or f"conv_{turn.id.removeprefix('resp_')}",
        previous_response_id=turn.req.previous_response_id,
        created_at=time.time(),
        input_items=items,
        body=body,
    )
    await asyncio.to_thread(store.save, stored, turn.model)


# -- routes ----------------------------------------------------------------------------------
@bp.post("/v1/responses")
async def create_response() -> Response:
    st = state()
    rec = record()
    req = parse(ResponsesRequest, await json_body())
    items = normalize_input(req.input)
    lm = st.engine.require_model()
    rec.model = lm.id
    store = _store()
    pin_seconds = st.settings.server.request_timeout_seconds + 60
    chain = await asyncio.to_thread(store.begin_turn, req.previous_response_id, None, pin_seconds)
    handed_over = False
    try:
        plan, job = await start_job(
            st,
            rec,
            lm,
            build_messages(req.instructions, chain.history, items),
            tools=req.tools,
            tool_choice=req.tool_choice,
            parallel=req.parallel_tool_calls,
            fmt=json_format((req.text or {}).get("format"), param="text.format", flat=True),
            sampling=Sampling(
                requested_max=req.max_output_tokens,
                max_param="max_output_tokens",
                temperature=req.temperature,
                top_p=req.top_p,
                seed=req.seed,
                repetition_penalty=req.repetition_penalty,
            ),
        )
        turn = _Turn(_new_id("resp"), int(time.time()), lm.id, req, job.params)
        if not req.stream:
            return await _complete(store, job, turn, chain, items, rec, plan)
        first = await first_event(st, job)
        rec.streaming = True
        keepalive = st.settings.server.sse_keepalive_seconds
        body = _stream(store, job, first, turn, chain, items, rec, keepalive, plan)
        handed_over = True
    finally:
        if not handed_over:
            store.end_turn(chain)  # a dict update under the store's lock: no disk access
    return sse_response(body)


async def _complete(
    store: Store,
    job: Job,
    turn: _Turn,
    chain: Chain,
    items: list[dict[str, Any]],
    rec: RequestRecord,
    plan: OutputPlan,
) -> Response:
    out = _Output(plan.reader())

    def take(event: Delta) -> None:
        out.reasoning_steps += bool(event.reasoning and not event.content)
        out.reasoning(event.reasoning)
        out.content(event.content)

    fin = await run_to_end(state(), job, rec, take)
    status = _status(fin)
    out.finish(status)
    body = turn.body(status, out.items(status), fin, reasoning_steps=out.reasoning_steps)
    await _save(store, turn, chain, items, body)
    return jsonify(body)


async def _stream(
    store: Store,
    job: Job,
    first: Event | None,
    turn: _Turn,
    chain: Chain,
    items: list[dict[str, Any]],
    rec: RequestRecord,
    keepalive: float,
    plan: OutputPlan,
) -> AsyncIterator[bytes]:
    # Runs after the handler returned, outside the request context: everything it needs is
    # passed in. It owns the conversation pin (released in finally).
    status_code = 200
    seq = 0
    out = _Output(plan.reader())

    def frame(kind: str, **payload: Any) -> bytes:
        nonlocal seq
        data = {"type": kind, "sequence_number": seq, **payload}
        seq += 1
        return sse.event_frame(data)

    try:
        yield frame("response.created", response=turn.body("in_progress", []))
        yield frame("response.in_progress", response=turn.body("in_progress", []))
        async for event in sse.events_after(job, first, keepalive):
            if event is None:
                yield sse.KEEPALIVE
            elif isinstance(event, Delta):
                if rec.first_token_at is None:
                    rec.first_token_at = time.perf_counter()
                out.reasoning_steps += bool(event.reasoning and not event.content)
                for kind, payload in out.reasoning(event.reasoning) + out.content(event.content):
                    yield frame(kind, **payload)
            elif isinstance(event, Failed):
                status_code = event.error.status
                rec.error = event.error.code or event.error.type
                yield frame("response.failed", response=turn.body("failed", [], error=event.error))
                return
            else:
                rec.completion_tokens = event.completion_tokens
                rec.cached_tokens = event.cached_tokens
                status = _status(event)
                for kind, payload in out.finish(status):
                    yield frame(kind, **payload)
                body = turn.body(
                    status, out.items(status), event, reasoning_steps=out.reasoning_steps
                )
                await _save(store, turn, chain, items, body)
                yield frame(f"response.{status}", response=body)
                return
    except asyncio.CancelledError:
        status_code = 499  # client closed the connection: nothing is stored
        rec.error = "client_disconnected"
        raise
    except MlxdError as exc:  # defensive: never leave a stream without a terminal event
        status_code = exc.status
        yield frame("response.failed", response=turn.body("failed", [], error=exc))
    finally:
        job.cancel()
        store.end_turn(chain)
        rec.finish(status_code)


async def _stored(response_id: str) -> StoredResponse:
    found = await asyncio.to_thread(_store().get, response_id)
    if found is None:
        raise NotFound(
            f"Response with id '{response_id}' not found.", param="response_id", code="not_found"
        )
    return found


@bp.get("/v1/responses/<response_id>")
async def retrieve_response(response_id: str) -> Response:
    return jsonify((await _stored(response_id)).body)


@bp.delete("/v1/responses/<response_id>")
async def delete_response(response_id: str) -> Response:
    if not await asyncio.to_thread(_store().delete, response_id):
        raise NotFound(
            f"Response with id '{response_id}' not found.", param="response_id", code="not_found"
        )
    return jsonify({"id": response_id, "object": "response", "deleted": True})


@bp.get("/v1/responses/<response_id>/input_items")
async def list_input_items(response_id: str) -> Response:
    found = await _stored(response_id)
    args = request.args
    order: Literal["asc", "desc"] = "desc"
    if args.get("order", "desc") not in ("asc", "desc"):
        raise BadRequest("order must be 'asc' or 'desc'", param="order", code="invalid_value")
    order = "asc" if args.get("order") == "asc" else "desc"
    try:
        limit = int(args.get("limit", "20"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        raise BadRequest(
            "limit must be an integer from 1 to 100", param="limit", code="invalid_value"
        )
    data = list(found.input_items)
    if order == "desc":
        data.reverse()
    after = args.get("after")
    if after:
        ids = [item.get("id") for item in data]
        if after not in ids:
            raise BadRequest(
                f"no input item with id '{after}'", param="after", code="invalid_value"
            )
        data = data[ids.index(after) + 1 :]
    page = data[:limit]
    return jsonify(
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(data) > limit,
        }
    )
