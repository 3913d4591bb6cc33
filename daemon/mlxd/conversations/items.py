"""Responses API input items: validating them as stored, and turning them into messages.

The items a request sends are normalised into the shape ``GET /v1/responses/{id}/input_items``
returns and the store keeps (every item has an id); stored items of earlier turns and the new
input become chat-template messages in one place (:func:`build_messages`).
"""

from __future__ import annotations

import uuid
from typing import Any

from ..errors import BadRequest
from ..prompt import content_text
from .store import StoredResponse

_MESSAGE_ROLES = ("user", "assistant", "system", "developer")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def normalize_input(raw: str | list[Any]) -> list[dict[str, Any]]:
    """The request's input as stored items, each with an id (``GET .../input_items`` returns them).

    Messages get content parts (``input_text``; ``output_text`` for assistant messages);
    ``function_call`` / ``function_call_output`` items are kept; replayed ``reasoning`` items are
    accepted and dropped (they do not reach the prompt).
    """
    if isinstance(raw, str):
        return [_message_item("user", [{"type": "input_text", "text": raw}], new_id("msg"))]
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
            items.append(_message_item(role, parts, str(item.get("id") or new_id("msg"))))
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
                    "id": str(item.get("id") or new_id("fc")),
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
                    "id": str(item.get("id") or new_id("fco")),
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
