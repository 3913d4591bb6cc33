"""Agent tool loops against the real daemon (bundled SmolLM2-135M, no template tool support).

Agents send ``tool_choice: "auto"`` on every turn after a tool ran. The bundled model, shown
the result, tends to call the same tool with the same arguments again, so the OpenAI Agents
SDK used to end in ``MaxTurnsExceeded``; mlxd now drops such a repeat and the model answers
in text (see docs in README "Agent loops"). bin/agent_loop.py measures the same over ten tasks.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
import pytest
from agents import (
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)

from conftest import Daemon

pytestmark = pytest.mark.e2e

WEATHER: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
ASK = {"role": "user", "content": "What is the weather in Paris?"}


@function_tool
def get_weather(city: str) -> str:
    """Current weather for a city."""
    return f"{city}: sunny, 21 degrees Celsius."


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_agents_sdk_run_ends_with_an_answer(shared_daemon: Daemon, api: str) -> None:
    """The Agents SDK with a first turn that must call the tool (then ``auto``, as the SDK
    resets tool_choice once a tool ran): the run ends within 3 turns with a text answer
    after exactly one call, instead of calling get_weather again until MaxTurnsExceeded."""
    set_tracing_disabled(True)
    client = openai.AsyncOpenAI(
        base_url=f"{shared_daemon.base_url}/v1", api_key="unused", timeout=300, max_retries=0
    )
    model: Any = (
        OpenAIChatCompletionsModel(model="m", openai_client=client)
        if api == "chat"
        else OpenAIResponsesModel(model="m", openai_client=client)
    )
    agent = Agent(
        name="assistant",
        instructions="You are a helpful assistant. Use a tool when it helps, then answer.",
        tools=[get_weather],
        model=model,
        model_settings=ModelSettings(temperature=0, max_tokens=64, tool_choice="required"),
    )

    async def run() -> Any:
        try:
            return await Runner.run(agent, ASK["content"], max_turns=3)
        finally:
            await client.close()

    result = asyncio.run(run())
    calls = [item for item in result.new_items if item.type == "tool_call_item"]
    assert len(calls) == 1
    assert str(result.final_output).strip()


def test_tool_choice_none_after_a_result_answers_in_text(client: openai.OpenAI) -> None:
    """After a tool result, tool_choice none gets text, not a copy of the earlier call's
    JSON line (which is how mlxd shows calls to a template-less model)."""
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    history: list[Any] = [
        ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Paris: sunny, 21 degrees."},
    ]
    resp = client.chat.completions.create(
        model="m", messages=history, tools=WEATHER, tool_choice="none", temperature=0,
        max_tokens=40,
    )  # fmt: skip
    content = resp.choices[0].message.content or ""
    assert content.strip()
    assert not content.lstrip().startswith("{") and '"arguments"' not in content


@pytest.mark.parametrize("seed", [1, 7])  # 7: repeated its call to max_tokens before
def test_repeated_parallel_call_ends_the_generation(client: openai.OpenAI, seed: int) -> None:
    """Calls with parallel_tool_calls: a call repeating an earlier one of the same output is
    dropped and ends decoding, so a request whose calls are complete is ``completed`` well
    before max_output_tokens, not ``incomplete`` (which the Agents SDK raises on)."""
    resp = client.responses.create(
        model="m", input=ASK["content"], tools=[{"type": "function", **WEATHER[0]["function"]}],
        tool_choice="required", temperature=0.7, max_output_tokens=80, extra_body={"seed": seed},
    )  # fmt: skip
    assert resp.status == "completed", resp.incomplete_details
    calls = [(o.name, json.loads(o.arguments)) for o in resp.output if o.type == "function_call"]
    assert calls and len({json.dumps(c) for c in calls}) == len(calls)
    assert resp.usage is not None and resp.usage.output_tokens < 80
