"""The Anthropic Messages API against the real daemon, through the official anthropic SDK."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx2 as httpx
import pytest

from conftest import Daemon

PARIS = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
GREEDY = {"temperature": 0}  # the 2.x SDK has no temperature argument: sent as extra_body
WEATHER = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
}


def claude(d: Daemon, **kw: Any) -> anthropic.Anthropic:
    kw.setdefault("api_key", "unused")
    return anthropic.Anthropic(base_url=d.base_url, max_retries=0, timeout=300.0, **kw)


@pytest.fixture
def client(shared_daemon: Daemon) -> anthropic.Anthropic:
    return claude(shared_daemon)


def test_create_and_stream_answer_alike(client: anthropic.Anthropic) -> None:
    """messages.create and messages.stream answer "Paris"; at temperature 0 the streamed text
    equals the non-streamed one; usage adds up and the stop reason is end_turn."""
    msg = client.messages.create(
        model="claude-sonnet-4-5", max_tokens=16, messages=PARIS, extra_body=GREEDY
    )
    assert msg.type == "message" and msg.role == "assistant"
    assert msg.content[0].type == "text"
    assert "paris" in msg.content[0].text.lower()
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    assert msg.usage.output_tokens > 0 and msg.usage.input_tokens >= 0
    assert msg.usage.input_tokens + (msg.usage.cache_read_input_tokens or 0) > 10

    with client.messages.stream(
        model="claude-sonnet-4-5", max_tokens=16, messages=PARIS, extra_body=GREEDY
    ) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == msg.content[0].text
    assert final.content[0].type == "text" and final.content[0].text == streamed
    assert final.usage.output_tokens == msg.usage.output_tokens
    total = final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0)
    assert total == msg.usage.input_tokens + (msg.usage.cache_read_input_tokens or 0)
    assert final.stop_reason == "end_turn"


def test_stream_event_sequence(shared_daemon: Daemon) -> None:
    """The raw stream: message_start, ping, content_block_start/delta/stop at index 0,
    message_delta with stop_reason and usage, message_stop — in that order."""
    body = {"model": "m", "max_tokens": 8, "messages": PARIS, "stream": True, **GREEDY}
    with shared_daemon.http(timeout=90) as http:
        resp = http.post("/v1/messages", json=body)
    text, rid = resp.text, resp.headers["x-request-id"]
    events = [json.loads(ln[6:]) for ln in text.splitlines() if ln.startswith("data: ")]
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["message_start", "ping"]
    assert kinds[-2:] == ["message_delta", "message_stop"]
    core = [k for k in kinds[2:-2] if k != "ping"]
    assert core[0] == "content_block_start" and core[-1] == "content_block_stop"
    assert set(core[1:-1]) == {"content_block_delta"}
    assert all(e.get("index", 0) == 0 for e in events if e["type"].startswith("content_block"))
    assert events[-2]["delta"]["stop_reason"] in ("end_turn", "max_tokens")
    assert events[-2]["usage"]["output_tokens"] > 0
    # the stream's one request.completed line is written at its end, with its counts
    lines = [
        e
        for e in shared_daemon.log_events()
        if e["event"] == "request.completed" and e["request_id"] == rid
    ]
    assert len(lines) == 1 and lines[0]["stream"] is True
    assert lines[0]["completion_tokens"] == events[-2]["usage"]["output_tokens"]


def test_named_tool_choice_gives_valid_tool_use_and_the_loop_ends(
    client: anthropic.Anthropic,
) -> None:
    """A named tool_choice yields a tool_use block whose input validates against its schema;
    streamed, the SDK assembles the same input from input_json_delta; after the tool_result
    the model answers in text."""
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    kw: dict[str, Any] = {
        "model": "m",
        "max_tokens": 60,
        "messages": ask,
        "tools": [WEATHER],
        "tool_choice": {"type": "tool", "name": "get_weather"},
        "extra_body": GREEDY,
    }
    msg = client.messages.create(**kw)
    uses = [b for b in msg.content if b.type == "tool_use"]
    assert msg.stop_reason == "tool_use" and len(uses) == 1
    use = uses[0]
    assert use.name == "get_weather" and use.id.startswith("toolu_")
    assert isinstance(use.input, dict) and set(use.input) == {"city"}
    assert isinstance(use.input["city"], str)

    with client.messages.stream(**kw) as stream:
        final = stream.get_final_message()
    streamed = [b for b in final.content if b.type == "tool_use"]
    assert len(streamed) == 1 and streamed[0].input == use.input

    history: list[Any] = [
        *ask,
        {"role": "assistant", "content": [use.model_dump()]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny, 21 C"}],
        },
    ]
    answer = client.messages.create(
        model="m",
        max_tokens=40,
        messages=history,
        tools=[WEATHER],
        tool_choice={"type": "none"},
        extra_body=GREEDY,
    )
    assert answer.stop_reason in ("end_turn", "max_tokens")
    assert [b.type for b in answer.content] == ["text"] and answer.content[0].text.strip()


def test_count_tokens_matches_the_prompt_of_create(client: anthropic.Anthropic) -> None:
    """count_tokens equals the prompt /v1/messages reports (input plus cache-read tokens),
    with a system prompt and tools too."""
    kw: dict[str, Any] = {
        "model": "m",
        "system": "You are terse.",
        "messages": [{"role": "user", "content": "Name a color."}],
        "tools": [WEATHER],
    }
    counted = client.messages.count_tokens(**kw)
    msg = client.messages.create(max_tokens=4, extra_body=GREEDY, **kw)
    assert counted.input_tokens > 20
    assert counted.input_tokens == msg.usage.input_tokens + (msg.usage.cache_read_input_tokens or 0)


def test_second_turn_reads_the_cache_despite_a_changing_billing_header(
    client: anthropic.Anthropic,
) -> None:
    """Claude Code's per-request billing-header line is dropped from the system prompt, so
    turn 2 of a conversation resent whole reports cache_read_input_tokens > 0."""

    def system(n: int) -> list[dict[str, Any]]:
        return [
            {"type": "text", "text": f"x-anthropic-billing-header: cc_version=2.0; cch={n:05x};"},
            {
                "type": "text",
                "text": "You are a helpful assistant who answers geography questions briefly.",
                "cache_control": {"type": "ephemeral"},
            },
        ]

    first = client.messages.create(
        model="m", max_tokens=12, system=system(1), messages=PARIS, extra_body=GREEDY
    )
    history: list[Any] = [
        *PARIS,
        {"role": "assistant", "content": first.content[0].model_dump()["text"]},
        {"role": "user", "content": "And of Italy?"},
    ]
    second = client.messages.create(
        model="m", max_tokens=12, system=system(2), messages=history, extra_body=GREEDY
    )
    assert (second.usage.cache_read_input_tokens or 0) > 20


def test_stop_sequence_is_reported(client: anthropic.Anthropic) -> None:
    """A matched stop sequence ends the text before it: stop_reason stop_sequence, and the
    matched string is named."""
    msg = client.messages.create(
        model="m",
        max_tokens=40,
        messages=[{"role": "user", "content": "Count from 1 to 10, separated by commas."}],
        stop_sequences=["5"],
        extra_body=GREEDY,
    )
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == "5"
    assert "5" not in msg.content[0].text  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"messages": PARIS}, "max_tokens"),
        ({"max_tokens": 8, "messages": [{"role": "assistant", "content": "Hi"}]}, "first"),
        (
            {"max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "video"}]}]},
            "video",
        ),
        (
            {
                "max_tokens": 8,
                "messages": PARIS,
                "tools": [{"name": "t", "input_schema": {"type": "object", "properties": 5}}],
            },
            "",
        ),
        ({"max_tokens": 8, "messages": PARIS, "temperature": 3}, "temperature"),
    ],
)
def test_bad_requests_are_anthropic_400s(
    client: anthropic.Anthropic, body: dict[str, Any], needle: str
) -> None:
    """Missing max_tokens, a first message not from the user, an unknown block type, a
    broken input_schema, a temperature out of range: BadRequestError with Anthropic's body."""
    with pytest.raises(anthropic.BadRequestError) as info:
        client.post("/v1/messages", body={"model": "m", **body}, cast_to=httpx.Response)
    err = info.value.body
    assert isinstance(err, dict) and err["type"] == "error"
    assert err["error"]["type"] == "invalid_request_error"
    assert needle in err["error"]["message"]


def test_unknown_route_and_method_are_anthropic_shaped(shared_daemon: Daemon) -> None:
    """Errors under /v1/messages never use the OpenAI shape."""
    with shared_daemon.http() as http:
        resp = http.get("/v1/messages")
    assert resp.status_code == 400
    assert resp.json()["type"] == "error" and "error" in resp.json()


def test_wrong_key_is_an_authentication_error(start_daemon: Any) -> None:
    """With keys configured: x-api-key and Bearer both work; a wrong key is the SDK's
    AuthenticationError with an Anthropic body."""
    d = start_daemon('[security]\napi_keys = ["sk-local-1"]\n')
    with pytest.raises(anthropic.AuthenticationError) as info:
        claude(d, api_key="wrong").messages.create(model="m", max_tokens=4, messages=PARIS)
    assert info.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    ok = claude(d, api_key="sk-local-1").messages.create(
        model="m", max_tokens=4, messages=PARIS, extra_body=GREEDY
    )
    assert ok.usage.output_tokens > 0
    bearer = claude(d, api_key=None, auth_token="sk-local-1").messages.count_tokens(
        model="m", messages=PARIS
    )
    assert bearer.input_tokens > 0
