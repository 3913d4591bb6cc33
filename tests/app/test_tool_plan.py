"""mlxd.api.tools: planning a tool turn after results came back, and reading its output.

Agent loops send ``tool_choice: "auto"`` on every turn; a template-less model (the bundled
SmolLM2) shown a tool result tends to call the same tool again. These pin the plan's side of
the loop guard (which calls count as answered, what the grammar and reader do with a repeat)
with the bundled model's real tokenizer and no forward pass.
"""

from __future__ import annotations

from mlxd.backend import preload_blas

preload_blas()  # before mlx is first imported (see tests/app/test_constrain.py)

import json  # noqa: E402
from types import SimpleNamespace  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

from mlxd.api.tools import (  # noqa: E402
    CallStarted,
    OutputPlan,
    Text,
    answered_calls,
    plan_output,
)
from mlxd.models.gguf import bundled_gguf_path, load_gguf  # noqa: E402

TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
HISTORY: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
]


@pytest.fixture(scope="module")
def lm() -> Any:
    _model, tokenizer, _ = load_gguf(bundled_gguf_path(), dequantize=None)
    return SimpleNamespace(tokenizer=tokenizer)


def test_answered_calls_are_the_last_turns_calls_with_results() -> None:
    """The calls of the assistant turn that the trailing tool results answer, arguments
    re-serialized as the grammar writes them; none once the conversation moved on."""
    assert answered_calls(HISTORY) == (("get_weather", '{"city": "Paris"}'),)
    assert answered_calls([*HISTORY, {"role": "user", "content": "And Rome?"}]) == ()
    assert answered_calls(HISTORY[:2]) == ()
    odd = [HISTORY[0], {"role": "assistant", "tool_calls": ["x", {"function": "f"}]}, HISTORY[2]]
    assert answered_calls(odd) == ()  # malformed calls are skipped, not a 500


def test_plan_after_a_result_guards_the_repeat(lm: Any) -> None:
    """tool_choice auto: the grammar knows the answered call's exact line and has an answer
    grammar for after it; parallel calls also end on an in-output repeat."""
    plan = plan_output(lm, tools=TOOLS, choice="auto", parallel=None, fmt=None)
    plan.prepare(HISTORY)
    assert plan.grammar is not None and plan.grammar.stop_on_repeat
    assert plan.grammar.answered == frozenset({CALL})
    assert plan.grammar.after_repeat is not None and plan.grammar.after_repeat.kind == "text"


def test_tool_choice_none_with_tools_is_text_that_cannot_be_a_call(lm: Any) -> None:
    """tool_choice none on a template-less model with tools: a text grammar, so the model
    cannot copy an earlier call's JSON line as its answer; without tools, unconstrained."""
    plan = plan_output(lm, tools=TOOLS, choice="none", parallel=None, fmt=None)
    assert plan.grammar is not None and plan.grammar.kind == "text"
    assert plan.reader().feed("It is sunny.") == [Text("It is sunny.")]
    assert plan_output(lm, tools=None, choice=None, parallel=None, fmt=None).grammar is None


@pytest.mark.parametrize("answer", ["It is sunny in Paris.", ""])
def test_reader_drops_a_repeat_of_an_answered_call(answer: str) -> None:
    """The repeat is held back and dropped; what follows it is the answer text. Any other
    call is read as usual."""
    functions = [{"name": "get_weather", "description": "", "parameters": {"type": "object"}}]
    plan = OutputPlan(functions, "auto", None, True, native=False, fmt=None)
    plan.grammar = object()  # type: ignore[assignment]  # constrained: mlxd's format
    plan.answered = (("get_weather", '{"city": "Paris"}'),)
    text = CALL + ("\n" + answer if answer else "")
    reader = plan.reader()
    events = [e for i in range(0, len(text), 4) for e in reader.feed(text[i : i + 4])]
    events += reader.finish()
    assert not reader.calls and not any(isinstance(e, CallStarted) for e in events)
    assert "".join(reader.text) == answer
    other = plan.reader()
    other.feed(CALL.replace("Paris", "Rome"))
    other.finish()
    assert [json.loads(c.arguments) for c in other.calls] == [{"city": "Rome"}]
