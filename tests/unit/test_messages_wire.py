"""Anthropic wire mapping without a model: errors, system prompt, blocks, stop reasons."""

from __future__ import annotations

from typing import Any

import pytest

from mlxd.api.messages_wire import (
    ContentBlocks,
    MessagesRequest,
    chat_messages,
    openai_tools,
    system_text,
)
from mlxd.api.pipeline import Reasoning
from mlxd.api.tools import Call, CallArguments, CallStarted, Text
from mlxd.engine.textfilter import TextFilter
from mlxd.errors import BadRequest, ModelUnavailable, NotFound, Overloaded, PayloadTooLarge


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [
        (BadRequest("x"), 400, "invalid_request_error"),
        (NotFound("x"), 404, "not_found_error"),
        (PayloadTooLarge("x"), 413, "request_too_large"),
        (Overloaded("x"), 529, "overloaded_error"),
        (ModelUnavailable("x"), 529, "overloaded_error"),
    ],
)
def test_errors_map_to_anthropic_types(error: Any, status: int, kind: str) -> None:
    """Each error has Anthropic's status and type; a busy server is 529 overloaded."""
    got_status, body = error.anthropic()
    assert (got_status, body["type"], body["error"]["type"]) == (status, "error", kind)


def test_billing_header_line_is_dropped_and_nothing_else() -> None:
    """Only Claude Code's per-request header line goes; other text stays exactly."""
    blocks = [
        {"type": "text", "text": "x-anthropic-billing-header: cc_version=2; cch=abc12;"},
        {"type": "text", "text": "\nYou are Claude Code."},
    ]
    assert system_text(blocks) == "You are Claude Code."
    assert system_text("Keep x-anthropic-billing-header: in prose") == (
        "Keep x-anthropic-billing-header: in prose"
    )


def test_tool_results_and_uses_become_chat_messages() -> None:
    """tool_use blocks become assistant tool_calls; tool_result blocks tool messages (an
    error result says so); thinking blocks of earlier turns are not shown again."""
    req = MessagesRequest.model_validate(
        {
            "max_tokens": 8,
            "system": "S",
            "messages": [
                {"role": "user", "content": "Weather?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "hmm", "signature": "s"},
                        {"type": "tool_use", "id": "toolu_1", "name": "w", "input": {"c": "P"}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "toolu_1",
                            "content": "boom",
                            "is_error": True,
                        },
                        {"type": "text", "text": "Then?"},
                    ],
                },
            ],
        }
    )
    msgs = chat_messages(req)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "user"]
    call = msgs[2]["tool_calls"][0]
    assert call["id"] == "toolu_1" and call["function"] == {"name": "w", "arguments": '{"c": "P"}'}
    assert msgs[3] == {"role": "tool", "tool_call_id": "toolu_1", "content": "Error: boom"}
    assert msgs[4]["content"] == "Then?"


def test_tool_choice_mapping() -> None:
    """any → required, a named tool → that function, disable_parallel_tool_use → serial."""
    base = {
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "x"}],
        "tools": [{"name": "w", "input_schema": {"type": "object"}}],
    }
    for choice, expected in [
        ({"type": "any"}, "required"),
        ({"type": "none"}, "none"),
        ({"type": "tool", "name": "w"}, {"type": "function", "function": {"name": "w"}}),
    ]:
        tools, mapped, _ = openai_tools(
            MessagesRequest.model_validate({**base, "tool_choice": choice})
        )
        assert mapped == expected and tools is not None
    req = MessagesRequest.model_validate(
        {**base, "tool_choice": {"type": "auto", "disable_parallel_tool_use": True}}
    )
    assert openai_tools(req)[2] is False


def test_blocks_stream_in_order_with_a_signature_before_thinking_ends() -> None:
    """thinking → text → tool_use: indexes count from 0, the thinking block gets a
    signature_delta before its stop, and the final content matches the stream."""
    blocks = ContentBlocks()
    call = Call(index=0, name="w")
    events = [
        *blocks.take(Reasoning("let me see")),
        *blocks.take(Text("Sure.")),
        *blocks.take(CallStarted(call)),
    ]
    call.arguments = '{"c": "P"}'
    events += blocks.take(CallArguments(call, '{"c": "P"}')) + blocks.close()
    kinds = [(e["type"], e["index"], e.get("delta", {}).get("type")) for e in events]
    assert kinds == [
        ("content_block_start", 0, None),
        ("content_block_delta", 0, "thinking_delta"),
        ("content_block_delta", 0, "signature_delta"),
        ("content_block_stop", 0, None),
        ("content_block_start", 1, None),
        ("content_block_delta", 1, "text_delta"),
        ("content_block_stop", 1, None),
        ("content_block_start", 2, None),
        ("content_block_delta", 2, "input_json_delta"),
        ("content_block_stop", 2, None),
    ]
    content = blocks.content()
    assert [b["type"] for b in content] == ["thinking", "text", "tool_use"]
    assert content[0]["signature"] and content[2]["input"] == {"c": "P"}


def test_textfilter_names_the_stop_string_that_matched() -> None:
    """The filter remembers which stop string ended the text (Anthropic's stop_sequence)."""
    f = TextFilter(stop=["END", "5"], reasoning="strip")
    out = f.feed("1, 2, 3, 4").content + f.feed(", 5, 6").content
    assert out == "1, 2, 3, 4, " and f.matched == "5"
    assert TextFilter(stop=["x"], reasoning="strip").matched is None
