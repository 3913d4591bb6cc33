"""Responses API wire shapes: the request, the output items and the Response object.

:class:`ResponsesRequest` validates a request body. :class:`OutputItems` is the only place
that builds output items; fed the pipeline's pieces it returns the streaming events each one
causes, so streamed and stored responses agree. :class:`ResponseHead` is what the Response
object repeats from the request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field, field_validator

from ..conversations.items import new_id
from ..engine.core import GenerationParams
from ..errors import MlxdError
from .logprobs import Logprobs
from .params import SamplingFields
from .pipeline import Done, Piece, Reasoning
from .tools import Call, CallArguments, CallStarted, Text


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
    include: list[str] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def logprobs_k(self) -> int | None:
        """None unless ``include`` asks for output text logprobs; else how many
        alternatives per token (``top_logprobs``, default 0)."""
        if LOGPROBS_INCLUDE in (self.include or []):
            return self.top_logprobs or 0
        return None

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


#: The ``include`` value that asks for the tokens of output text with their logprobs.
LOGPROBS_INCLUDE = "message.output_text.logprobs"

OutputEvent = tuple[str, dict[str, Any]]  # (event type, payload without type/sequence)


@dataclass
class _Item:
    kind: str  # "reasoning" | "message" | "function_call"
    id: str
    text: list[str] = field(default_factory=list)
    call: Call | None = None
    done: bool = False
    logprobs: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class OutputItems:
    """The output items of one response; the only place that builds them.

    Fed the pipeline's pieces, it keeps the items in output order and returns the streaming
    events each piece causes (the non-streaming path ignores them). An item is closed when the
    next one opens; at the end a response without calls always has a message item.
    """

    entries: list[_Item] = field(default_factory=list)
    #: Logprobs of tokens whose text has not come yet (they precede it in the pipeline).
    pending: list[dict[str, Any]] = field(default_factory=list)

    def take(self, piece: Piece) -> list[OutputEvent]:
        if isinstance(piece, Logprobs):
            self.pending += [e.wire() for e in piece.entries]
            return []
        if isinstance(piece, Reasoning):
            self.pending.clear()  # output text logprobs only
            return self._reasoning(piece.text)
        return self._read([piece])

    def finish(self, status: str) -> list[OutputEvent]:
        events: list[OutputEvent] = []
        if not any(e.kind != "reasoning" for e in self.entries):
            events += self._open("message")
        last = self.entries[-1]
        if last.kind == "message" and not last.done:
            last.logprobs += self.pending
        self.pending = []
        return events + self._close(status)

    def _reasoning(self, text: str) -> list[OutputEvent]:
        events = self._open("reasoning")
        i = len(self.entries) - 1
        self.entries[i].text.append(text)
        loc = {"item_id": self.entries[i].id, "output_index": i, "content_index": 0}
        return [*events, ("response.reasoning_text.delta", {**loc, "delta": text})]

    def items(self, status: str) -> list[dict[str, Any]]:
        return [self._snapshot(e, status) for e in self.entries]

    def _read(self, read: list[Text | CallStarted | CallArguments]) -> list[OutputEvent]:
        events: list[OutputEvent] = []
        for ev in read:
            if isinstance(ev, Text):
                events += self._open("message")
                i = len(self.entries) - 1
                self.entries[i].text.append(ev.text)
                tokens, self.pending = self.pending, []
                self.entries[i].logprobs += tokens
                loc = {"item_id": self.entries[i].id, "output_index": i, "content_index": 0}
                events.append(
                    ("response.output_text.delta", {**loc, "delta": ev.text, "logprobs": tokens})
                )
            elif isinstance(ev, CallStarted):
                self.pending.clear()  # output text logprobs only
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
        entry = _Item(kind, new_id(prefix), call=call)
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
            events.append(
                ("response.output_text.done", {**loc, "text": text, "logprobs": entry.logprobs})
            )
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
        return {
            "type": "output_text",
            "text": text,
            "annotations": [],
            "logprobs": list(entry.logprobs),
        }

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
class ResponseHead:
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
        done: Done | None = None,
        error: MlxdError | None = None,
    ) -> dict[str, Any]:
        req = self.req
        usage = None
        if done is not None:
            fin = done.finished
            usage = {
                "input_tokens": fin.prompt_tokens,
                "input_tokens_details": {
                    "cached_tokens": fin.cached_tokens,
                    "cache_write_tokens": 0,
                },
                "output_tokens": fin.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": fin.reasoning_tokens},
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
            "top_logprobs": req.top_logprobs,
            "text": {"format": (req.text or {}).get("format") or {"type": "text"}},
            "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
            "tools": req.tools or [],
            "truncation": req.truncation or "disabled",
            "usage": usage,
            "metadata": req.metadata or {},
            "user": req.user,
        }


def status_of(done: Done) -> str:
    return "incomplete" if done.finished.finish_reason == "length" else "completed"
