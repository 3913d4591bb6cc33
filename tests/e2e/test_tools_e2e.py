"""Function calling against the real daemon (bundled SmolLM2-135M) through the OpenAI SDK.

SmolLM2's chat template ignores ``tools``, so these exercise mlxd's own path: tools rendered
into the system prompt and grammar-constrained calls.
"""

from __future__ import annotations

import concurrent.futures
import json
from typing import Any

import httpx2 as httpx
import openai
import pytest

pytestmark = pytest.mark.e2e

WEATHER_PARAMS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
}
CHAT_TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather forecast for a city",
            "parameters": WEATHER_PARAMS,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        },
    },
]
RESP_TOOLS: list[Any] = [
    {"type": "function", "name": "get_weather", "parameters": WEATHER_PARAMS, "strict": True},
    {"type": "custom", "name": "shell"},  # not a function tool: ignored, not rejected
]
ASK = [{"role": "user", "content": "What will the weather be in Paris for the next 3 days?"}]
NAMED_CHAT = {"type": "function", "function": {"name": "get_weather"}}
NAMED_RESP = {"type": "function", "name": "get_weather"}


def check_weather_args(arguments: str) -> dict[str, Any]:
    """The arguments parse and validate against WEATHER_PARAMS (closed object)."""
    args = json.loads(arguments)
    assert set(args) == {"city", "unit", "days"}, args
    assert isinstance(args["city"], str)
    assert args["unit"] in ("celsius", "fahrenheit")
    assert type(args["days"]) is int and 1 <= args["days"] <= 7
    return dict(args)


def test_named_tool_choice_non_streaming(client: openai.OpenAI) -> None:
    """tool_choice naming a function: one call to it, arguments valid, finish_reason
    tool_calls, content null, a call_ id."""
    resp = client.chat.completions.create(
        model="m", messages=ASK, tools=CHAT_TOOLS, tool_choice=NAMED_CHAT, temperature=0.7, seed=1
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert len(calls) == 1
    call = calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    check_weather_args(call.function.arguments)


def test_named_tool_choice_streaming_sdk_helper(client: openai.OpenAI) -> None:
    """Streaming through client.chat.completions.stream(): the helper accepts every delta
    (each carries index) and get_final_completion() has the same valid call."""
    with client.chat.completions.stream(
        model="m", messages=ASK, tools=CHAT_TOOLS, tool_choice=NAMED_CHAT, temperature=0
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    check_weather_args(call.function.arguments)


def test_stream_tool_deltas_shape(http: httpx.Client) -> None:
    """Raw SSE: the first tool delta has index, id, type and name with empty arguments; later
    ones only index and an arguments piece (several of them: arguments stream); the last
    choice chunk says tool_calls."""
    body = {
        "messages": ASK,
        "tools": CHAT_TOOLS,
        "tool_choice": "required",
        "temperature": 0,
        "stream": True,
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        frames = [
            json.loads(ln[6:])
            for ln in resp.iter_lines()
            if ln.startswith("data: ") and ln != "data: [DONE]"
        ]
    tool_deltas = [d for f in frames for d in (f["choices"][0]["delta"].get("tool_calls") or [])]
    assert all("index" in d for d in tool_deltas)
    first = tool_deltas[0]
    assert first["id"].startswith("call_") and first["type"] == "function"
    assert first["function"]["arguments"] == "" and first["function"]["name"]
    assert len(tool_deltas) > 2
    assert all(set(d) == {"index", "function"} for d in tool_deltas[1:] if "id" not in d)
    assert frames[-1]["choices"][0]["finish_reason"] == "tool_calls"
    by_index: dict[int, str] = {}
    for d in tool_deltas:
        by_index[d["index"]] = by_index.get(d["index"], "") + d["function"]["arguments"]
    for arguments in by_index.values():
        json.loads(arguments)


def test_chat_full_loop(client: openai.OpenAI) -> None:
    """Call, tool result (assistant tool_calls message + role tool message), final answer."""
    first = client.chat.completions.create(
        model="m", messages=ASK, tools=CHAT_TOOLS, tool_choice=NAMED_CHAT, temperature=0
    )
    message = first.choices[0].message
    (call,) = message.tool_calls or []
    history: list[Any] = [
        *ASK,
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 degrees all week."},
    ]
    final = client.chat.completions.create(
        model="m", messages=history, tools=CHAT_TOOLS, tool_choice="none", temperature=0,
        max_tokens=40,
    )  # fmt: skip
    choice = final.choices[0]
    assert choice.message.tool_calls is None
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")


def test_auto_is_text_or_valid_call(client: openai.OpenAI) -> None:
    """tool_choice auto on a model without template tool support: the answer is either plain
    text or calls that parse and match their function's schema, never a call leaked as text."""

    def one(seed: int, temperature: float) -> Any:
        return client.chat.completions.create(
            model="m", messages=ASK, tools=CHAT_TOOLS, temperature=temperature, seed=seed,
            max_tokens=48,
        )  # fmt: skip

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(one, [1, 2, 3], [0.0, 0.8, 1.2]))
    for resp in answers:
        choice = resp.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason in ("tool_calls", "length")
            for call in choice.message.tool_calls:
                assert call.function.name in ("get_weather", "add")
                if choice.finish_reason == "tool_calls":
                    json.loads(call.function.arguments)
        else:
            assert not (choice.message.content or "").lstrip().startswith('{"name"')


def test_tool_choice_errors(client: openai.OpenAI) -> None:
    """A tool_choice naming a function not in tools, or 'required' without tools, is a 400."""
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="m",
            messages=ASK,
            tools=CHAT_TOOLS,
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    assert err.value.code == "invalid_value"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=ASK, tool_choice="required")


def test_responses_named_call_and_loop(client: openai.OpenAI) -> None:
    """Responses: a named tool_choice yields a function_call item (fc_ id, call_ call_id,
    valid JSON arguments, completed); custom tools are ignored; then previous_response_id +
    function_call_output gets a final message, and the stored chain replays the call."""
    first = client.responses.create(
        model="m", input=ASK[0]["content"], tools=RESP_TOOLS, tool_choice=NAMED_RESP,
        temperature=0,
    )  # fmt: skip
    assert first.status == "completed"
    (item,) = first.output
    assert item.type == "function_call"
    assert item.id and item.id.startswith("fc_") and item.call_id.startswith("call_")
    assert item.status == "completed" and item.name == "get_weather"
    check_weather_args(item.arguments)
    final = client.responses.create(
        model="m",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": item.call_id, "output": "Sunny, 21C"}],
        tools=RESP_TOOLS,
        tool_choice="none",
        temperature=0,
        max_output_tokens=40,
    )
    assert [o.type for o in final.output] == ["message"]
    assert final.output_text
    stored = client.responses.retrieve(first.id)
    assert stored.output[0].type == "function_call"


def test_responses_stream_helper_function_call(client: openai.OpenAI) -> None:
    """client.responses.stream(): output_item.added (in_progress, empty arguments), argument
    deltas and .done with name and arguments, output_item.done, no content-part events; the
    final response carries the completed function_call item."""
    with client.responses.stream(
        model="m", input=ASK[0]["content"], tools=RESP_TOOLS, tool_choice=NAMED_RESP,
        temperature=0,
    ) as stream:  # fmt: skip
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert "response.content_part.added" not in kinds
    added = next(e for e in events if e.type == "response.output_item.added")
    assert added.item.type == "function_call"
    assert added.item.status == "in_progress" and added.item.arguments == ""
    deltas = [e for e in events if e.type == "response.function_call_arguments.delta"]
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert "".join(d.delta for d in deltas) == done.arguments
    assert done.name == "get_weather"  # type: ignore[attr-defined]
    check_weather_args(done.arguments)
    (item,) = final.output
    assert item.type == "function_call" and item.arguments == done.arguments
    assert kinds[-1] == "response.completed"


@pytest.mark.parametrize("native", [False, True])
def test_output_reader_units(native: bool) -> None:
    """Unit (no daemon): mlxd's call format streams arguments and drops an exact repeat of an
    earlier call; a native-format model's <tool_call> block is parsed with mlx-lm's parser
    and the text around it is kept."""
    from mlx_lm.tool_parsers import json_tools

    from mlxd.api.tools import CallArguments, CallStarted, OutputPlan, Text

    functions = [{"name": "add", "description": "", "parameters": {"type": "object"}}]
    plan = OutputPlan(functions, "auto", None, True, native=native, fmt=None)
    if native:
        plan.parser, plan.markers = json_tools.parse_tool_call, ("<tool_call>", "</tool_call>")
        out = '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>'
        pieces = ["Sure. <tool", "_call>", out[len("<tool_call>") :]]
    else:
        plan.grammar = object()  # type: ignore[assignment]  # constrained: mlxd's format
        call = '{"name": "add", "arguments": {"a": 1, "s": "}"}}'
        text = call + "\n" + call + "\n" + call.replace("1", "2")
        pieces = [text[i : i + 3] for i in range(0, len(text), 3)]
    reader = plan.reader()
    events = [e for p in pieces for e in reader.feed(p)] + reader.finish()
    starts = [e for e in events if isinstance(e, CallStarted)]
    if native:
        assert "".join(e.text for e in events if isinstance(e, Text)) == "Sure. "
        assert [(c.name, json.loads(c.arguments)) for c in reader.calls] == [("add", {"a": 1})]
    else:
        assert not any(isinstance(e, Text) for e in events)
        assert [json.loads(c.arguments) for c in reader.calls] == [
            {"a": 1, "s": "}"},
            {"a": 2, "s": "}"},
        ]
        assert [s.call.index for s in starts] == [0, 1]
        assert sum(isinstance(e, CallArguments) for e in events) > 2  # streamed in pieces
