"""How many agent tasks reach a final answer within a few turns, through the OpenAI Agents SDK.

Real agents send ``tool_choice: "auto"`` on every turn; a small model may call the same tool
again after its result came back until the run ends in ``MaxTurnsExceeded``. This runs ten
varied tasks (one tool each, arguments a model can fill) against a running mlxd with the
Agents SDK, over Chat Completions and over Responses, and prints one line per task and a
total per API::

    .venv/bin/python bin/agent_loop.py --base-url http://127.0.0.1:8080/v1 [--max-turns 3]

A task counts as answered when the run ends with a non-empty final output within
``--max-turns`` model calls; ``MaxTurnsExceeded``, ``ModelBehaviorError`` and an empty
answer count as not answered. Results of docs/tools.md ("Agent loops") come from here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any

from agents import (
    Agent,
    MaxTurnsExceeded,
    ModelBehaviorError,
    ModelSettings,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from openai import AsyncOpenAI


@function_tool
def get_weather(city: str) -> str:
    """Current weather for a city."""
    return f"{city}: sunny, 21 degrees Celsius."


@function_tool
def add(a: int, b: int) -> str:
    """Add two integers."""
    return str(a + b)


@function_tool
def capital_of(country: str) -> str:
    """The capital city of a country."""
    capitals = {"france": "Paris", "japan": "Tokyo", "kenya": "Nairobi", "peru": "Lima"}
    return capitals.get(country.strip().lower(), "unknown")


@function_tool
def convert_currency(amount: float, source: str, target: str) -> str:
    """Convert an amount of money from one currency to another."""
    return f"{amount} {source} is {round(amount * 1.1, 2)} {target}."


@function_tool
def local_time(city: str) -> str:
    """The local time in a city."""
    return f"It is 14:05 in {city}."


@function_tool
def search_docs(query: str) -> str:
    """Search the product documentation."""
    return f"Top result for {query!r}: restart the service with `mlxd restart`."


@function_tool
def word_count(text: str) -> str:
    """Count the words in a text."""
    return str(len(text.split()))


@function_tool
def stock_price(ticker: str) -> str:
    """The latest stock price for a ticker symbol."""
    return f"{ticker.upper()} trades at 187.20 USD."


TOOLS = [
    get_weather,
    add,
    capital_of,
    convert_currency,
    local_time,
    search_docs,
    word_count,
    stock_price,
]
TASKS = [
    "What is the weather in Paris?",
    "What is 17 plus 25?",
    "What is the capital of Japan?",
    "Convert 100 EUR to USD.",
    "What time is it in Tokyo?",
    "How do I restart the service? Search the docs.",
    "How many words are in 'the quick brown fox jumps'?",
    "What is the stock price of AAPL?",
    "Is it sunny in Nairobi today?",
    "Add 3 and 4, then tell me the result.",
]


async def run_task(
    model: Any, task: str, max_turns: int, first: str, temperature: float | None, seed: int
) -> tuple[bool, str]:
    """One agent run: (answered, what happened). ``first`` is the first turn's tool_choice;
    the SDK sends ``auto`` after a tool ran (``reset_tool_choice``). ``temperature`` None
    sends none (the daemon's default), as agents usually do; ``seed`` makes it repeatable."""
    agent = Agent(
        name="assistant",
        instructions="You are a helpful assistant. Use a tool when it helps, then answer.",
        tools=list(TOOLS),
        model=model,
        model_settings=ModelSettings(
            temperature=temperature,
            max_tokens=96,
            tool_choice=first,
            extra_body={"seed": seed},
        ),
    )
    try:
        result = await Runner.run(agent, task, max_turns=max_turns)
    except MaxTurnsExceeded:
        return False, "MaxTurnsExceeded"
    except ModelBehaviorError as exc:
        return False, f"ModelBehaviorError: {exc}"
    answer = str(result.final_output or "").strip()
    calls = sum(1 for item in result.new_items if item.type == "tool_call_item")
    if not answer:
        return False, f"empty answer after {calls} call(s)"
    return True, f"{calls} call(s), answer {json.dumps(answer[:60])}"


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    parser.add_argument("--max-turns", type=int, default=3)
    parser.add_argument("--api", choices=["chat", "responses", "both"], default="both")
    parser.add_argument(
        "--first",
        choices=["auto", "required"],
        default="auto",
        help="tool_choice of the first turn (required: every task starts with a tool call)",
    )
    parser.add_argument(
        "--temperature",
        default="0",
        help="sampling temperature, or 'default' to send none (the daemon's [model] default)",
    )
    args = parser.parse_args(argv)
    set_tracing_disabled(True)
    client = AsyncOpenAI(base_url=args.base_url, api_key="unused", timeout=600, max_retries=0)
    makers: dict[str, Callable[[], Any]] = {
        "chat": lambda: OpenAIChatCompletionsModel(model="m", openai_client=client),
        "responses": lambda: OpenAIResponsesModel(model="m", openai_client=client),
    }
    temperature = None if args.temperature == "default" else float(args.temperature)
    apis = list(makers) if args.api == "both" else [args.api]
    for api in apis:
        answered = 0
        for seed, task in enumerate(TASKS):
            ok, what = await run_task(
                makers[api](), task, args.max_turns, args.first, temperature, seed
            )
            answered += ok
            print(f"{api:9} {'ok ' if ok else 'NO '} {task[:44]:44} {what}", flush=True)
        print(
            f"{api} (first turn {args.first}, temperature {args.temperature}): "
            f"{answered}/{len(TASKS)} answered "
            f"within {args.max_turns} turns",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
