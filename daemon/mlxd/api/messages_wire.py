"""Anthropic Messages wire shapes: the request, its mapping to chat messages, the output.

:class:`MessagesRequest` validates a body; :func:`chat_messages` and :func:`openai_tools` turn
it into what :mod:`mlxd.api.pipeline` takes; :class:`ContentBlocks` builds the content blocks
from the pipeline's pieces (and the stream events each causes); :class:`EventRenderer` is
the SSE renderer. The routes and the mapping decisions are in :mod:`mlxd.api.messages`.

One piece: the request model, its mapping to chat messages and the content-block builder are
the whole Anthropic wire shape; the routes live in :mod:`mlxd.api.messages`.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import BadRequest, MlxdError
from . import sse
from .pipeline import Done, Piece, Reasoning
from .tools import Call, CallArguments, CallStarted, Text

#: The per-request line Claude Code puts at the top of its system prompt.
BILLING_HEADER = "x-anthropic-billing-header:"


class _Lax(BaseModel):
    model_config = ConfigDict(extra="ignore")


class InputMessage(_Lax):
    # "system" is not in Anthropic's schema, but Claude Code sends system reminders that
    # way in the message list; they reach the template as system messages where they stand.
    role: Literal["user", "assistant", "system"]
    content: str | list[dict[str, Any]]


class ToolDefinition(_Lax):
    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")
    description: str | None = None
    input_schema: dict[str, Any]
    type: str | None = None

    @field_validator("type")
    @classmethod
    def _custom_only(cls, v: str | None) -> str | None:
        if v not in (None, "custom"):
            raise ValueError(f"server tool {v!r} is not available on a local model")
        return v


class ToolChoice(_Lax):
    type: Literal["auto", "any", "none", "tool"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class ThinkingConfig(_Lax):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None


class CountTokensRequest(_Lax):
    """The body of ``count_tokens``: a Messages request without the generation fields."""

    model: str | None = None
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    stop_sequences: list[str] | None = Field(None, max_length=16)
    stream: bool = False
    metadata: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _thinking_budget(self) -> MessagesRequest:
        t = self.thinking
        if t is not None and t.type == "enabled":
            budget = t.budget_tokens
            if budget is None or budget < 1024:
                raise ValueError("thinking.budget_tokens must be at least 1024")
            if budget >= self.max_tokens:
                raise ValueError("thinking.budget_tokens must be less than max_tokens")
        return self


# -- request → chat messages -----------------------------------------------------------------
def _text_of(blocks: str | list[Any], param: str) -> str:
    """Text blocks (or a string) as one string; anything else is refused clearly."""
    if isinstance(blocks, str):
        return blocks
    texts: list[str] = []
    for i, block in enumerate(blocks):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind in ("image", "document"):
            raise BadRequest(
                f"{kind} blocks are not supported by this model (text only)",
                param=f"{param}[{i}]",
                code="unsupported_content",
            )
        else:
            raise BadRequest(f"expected a text block, got {kind!r}", param=f"{param}[{i}]")
    return "".join(texts)


def system_text(system: str | list[dict[str, Any]] | None) -> str:
    """The system prompt without Claude Code's per-request billing-header line."""
    if system is None:
        return ""
    text = _text_of(system, "system")
    lines = text.split("\n")
    kept = [ln for ln in lines if not ln.startswith(BILLING_HEADER)]
    return "\n".join(kept).strip("\n") if len(kept) != len(lines) else text


def chat_messages(req: CountTokensRequest) -> list[dict[str, Any]]:
    """The conversation as chat-template messages (OpenAI-shaped, as the pipeline takes)."""
    out: list[dict[str, Any]] = []
    system = system_text(req.system)
    if system:
        out.append({"role": "system", "content": system})
    if req.messages[0].role != "user":
        raise BadRequest("the first message must use the 'user' role", param="messages[0].role")
    for i, msg in enumerate(req.messages):
        param = f"messages[{i}].content"
        if isinstance(msg.content, str):
            out.append({"role": msg.role, "content": msg.content})
        elif msg.role == "system":
            out.append({"role": "system", "content": _text_of(msg.content, param)})
        elif msg.role == "user":
            out.extend(_user_blocks(msg.content, param))
        else:
            out.append(_assistant_blocks(msg.content, param))
    return out


def _user_blocks(blocks: list[dict[str, Any]], param: str) -> list[dict[str, Any]]:
    """Tool results first (each its own ``tool`` message), then the user's text."""
    results: list[dict[str, Any]] = []
    texts: list[str] = []
    for j, block in enumerate(blocks):
        kind = block.get("type")
        where = f"{param}[{j}]"
        if kind == "tool_result":
            call_id = block.get("tool_use_id")
            if not isinstance(call_id, str):
                raise BadRequest("a tool_result block needs 'tool_use_id'", param=where)
            content = block.get("content", "")
            text = _text_of(content if content is not None else "", f"{where}.content")
            if block.get("is_error"):
                text = f"Error: {text}"
            results.append({"role": "tool", "tool_call_id": call_id, "content": text})
        else:
            texts.append(_text_of([block], param))
    if texts or not results:
        results.append({"role": "user", "content": "".join(texts)})
    return results


def _assistant_blocks(blocks: list[dict[str, Any]], param: str) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        kind = block.get("type")
        where = f"{param}[{j}]"
        if kind == "text":
            texts.append(_text_of([block], param))
        elif kind == "tool_use":
            name, args, call_id = block.get("name"), block.get("input"), block.get("id")
            if not isinstance(name, str) or not isinstance(args, dict):
                raise BadRequest("a tool_use block needs 'name' and an object 'input'", param=where)
            calls.append(
                {
                    "id": call_id if isinstance(call_id, str) else f"toolu_{uuid.uuid4().hex}",
                    "type": "function",
                    "function": {"name": name, "arguments": json.dumps(args)},
                }
            )
        elif kind in ("thinking", "redacted_thinking"):
            continue  # earlier turns' thinking is not shown to the model again
        else:
            raise BadRequest(f"unknown content block type {kind!r}", param=f"{where}.type")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if calls:
        message["tool_calls"] = calls
    return message


def openai_tools(req: CountTokensRequest) -> tuple[list[dict[str, Any]] | None, Any, bool | None]:
    """``(tools, tool_choice, parallel)`` in the OpenAI spelling the planner reads."""
    tools = [
        {
            "type": "function",
            "function": {
                "name": t.name,
                "description": t.description or "",
                "parameters": t.input_schema,
            },
        }
        for t in req.tools or []
    ]
    choice = req.tool_choice
    parallel = (
        None
        if choice is None or choice.disable_parallel_tool_use is None
        else (not choice.disable_parallel_tool_use)
    )
    if choice is None:
        mapped: Any = None
    elif choice.type == "tool":
        if not choice.name:
            raise BadRequest("tool_choice of type 'tool' needs 'name'", param="tool_choice")
        mapped = {"type": "function", "function": {"name": choice.name}}
    else:
        mapped = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
    return tools or None, mapped, parallel


def reasoning_mode(req: CountTokensRequest) -> str | None:
    if req.thinking is None:
        return None
    return "strip" if req.thinking.type == "disabled" else "separate"


# -- output ----------------------------------------------------------------------------------
def usage(done: Done) -> dict[str, int]:
    fin = done.finished
    return {
        "input_tokens": fin.prompt_tokens - fin.cached_tokens,
        "output_tokens": fin.completion_tokens,
        "cache_read_input_tokens": fin.cached_tokens,
        "cache_creation_input_tokens": 0,
    }


def stop_reason(done: Done) -> tuple[str, str | None]:
    """``(stop_reason, stop_sequence)``."""
    reason = done.finish_reason
    if reason == "tool_calls":
        return "tool_use", None
    if reason == "length":
        return "max_tokens", None
    matched = done.finished.stop_sequence
    return ("stop_sequence", matched) if matched else ("end_turn", None)


def _tool_use_id(call: Call) -> str:
    return f"toolu_{call.id.removeprefix('call_')}"


def _signature(thinking: str) -> str:
    """An opaque signature for a thinking block (clients send it back; mlxd ignores it)."""
    return "mlxd-" + hashlib.sha256(thinking.encode()).hexdigest()[:32]


def _tool_input(call: Call) -> dict[str, Any]:
    try:
        value = json.loads(call.arguments)
    except json.JSONDecodeError:  # cut off by max_tokens
        return {}
    return value if isinstance(value, dict) else {}


BlockEvent = dict[str, Any]


@dataclass
class _Block:
    kind: str  # "thinking" | "text" | "tool_use"
    text: list[str] = field(default_factory=list)
    call: Call | None = None

    def body(self) -> dict[str, Any]:
        if self.kind == "thinking":
            thinking = "".join(self.text)
            return {"type": "thinking", "thinking": thinking, "signature": _signature(thinking)}
        if self.kind == "text":
            return {"type": "text", "text": "".join(self.text)}
        assert self.call is not None
        return {
            "type": "tool_use",
            "id": _tool_use_id(self.call),
            "name": self.call.name,
            "input": _tool_input(self.call),
        }


@dataclass
class ContentBlocks:
    """The message's content blocks, built from pipeline pieces in one place; each piece
    returns the stream events it causes (the non-streaming path ignores them)."""

    blocks: list[_Block] = field(default_factory=list)
    open: bool = False

    def take(self, piece: Piece) -> list[BlockEvent]:
        if isinstance(piece, Reasoning):
            return self._append("thinking", piece.text, "thinking_delta", "thinking")
        if isinstance(piece, Text):
            return self._append("text", piece.text, "text_delta", "text")
        if isinstance(piece, CallStarted):
            events = self.close()
            self.blocks.append(_Block("tool_use", call=piece.call))
            self.open = True
            start = {
                "type": "tool_use",
                "id": _tool_use_id(piece.call),
                "name": piece.call.name,
                "input": {},
            }
            return [*events, self._event("content_block_start", content_block=start)]
        assert isinstance(piece, CallArguments)
        delta = {"type": "input_json_delta", "partial_json": piece.delta}
        return [self._event("content_block_delta", delta=delta)]

    def close(self) -> list[BlockEvent]:
        """Events that end the open block (a thinking block gets its signature first)."""
        if not self.open:
            return []
        self.open = False
        block = self.blocks[-1]
        events: list[BlockEvent] = []
        if block.kind == "thinking":
            signature = _signature("".join(block.text))
            delta = {"type": "signature_delta", "signature": signature}
            events.append(self._event("content_block_delta", delta=delta))
        return [*events, self._event("content_block_stop")]

    def content(self) -> list[dict[str, Any]]:
        return [b.body() for b in self.blocks]

    def _append(self, kind: str, text: str, delta_type: str, key: str) -> list[BlockEvent]:
        events: list[BlockEvent] = []
        if not (self.open and self.blocks[-1].kind == kind):
            events = self.close()
            self.blocks.append(_Block(kind))
            self.open = True
            events.append(self._event("content_block_start", content_block={"type": kind, key: ""}))
        self.blocks[-1].text.append(text)
        delta = {"type": delta_type, key: text}
        return [*events, self._event("content_block_delta", delta=delta)]

    def _event(self, kind: str, **payload: Any) -> BlockEvent:
        return {"type": kind, "index": len(self.blocks) - 1, **payload}


@dataclass(frozen=True)
class MessageHead:
    id: str
    model: str

    def message(
        self, content: list[dict[str, Any]], done: Done | None, prompt_tokens: int
    ) -> dict[str, Any]:
        reason, matched = stop_reason(done) if done is not None else (None, None)
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": reason,
            "stop_sequence": matched,
            "usage": usage(done)
            if done is not None
            else {
                "input_tokens": prompt_tokens,
                "output_tokens": 0,
                "cache_read_input_tokens": 0,
                "cache_creation_input_tokens": 0,
            },
        }


@dataclass
class EventRenderer:
    """The renderer: Anthropic's typed events, ``ping`` as the keep-alive."""

    head: MessageHead
    prompt_tokens: int
    blocks: ContentBlocks = field(default_factory=ContentBlocks)

    def opening(self) -> list[bytes]:
        start = {
            "type": "message_start",
            "message": self.head.message([], None, self.prompt_tokens),
        }
        return [sse.event_frame(start), sse.event_frame({"type": "ping"})]

    def keepalive(self) -> bytes:
        return sse.event_frame({"type": "ping"})

    def piece(self, piece: Piece) -> list[bytes]:
        return [sse.event_frame(e) for e in self.blocks.take(piece)]

    async def done(self, done: Done) -> list[bytes]:
        reason, matched = stop_reason(done)
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": matched},
            "usage": usage(done),
        }
        frames = [sse.event_frame(e) for e in self.blocks.close()]
        return [*frames, sse.event_frame(delta), sse.event_frame({"type": "message_stop"})]

    def failed(self, error: MlxdError) -> list[bytes]:
        _, body = error.anthropic()
        return [sse.event_frame(body)]

    def close(self) -> None:
        return None
