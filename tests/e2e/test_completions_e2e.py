"""Legacy text completions and Chat ``n`` against the real daemon, through the OpenAI SDK."""

from __future__ import annotations

from typing import Any

import httpx2 as httpx
import openai
import pytest

from conftest import assert_openai_error

FRANCE = "The capital of France is"


def test_completion_continues_the_prompt(client: openai.OpenAI) -> None:
    """A raw prompt (no chat template) is continued: the capital prompt gives Paris, with the
    leading space a continuation needs, and usage counts prompt and completion."""
    resp = client.completions.create(model="m", prompt=FRANCE, max_tokens=5, temperature=0)
    choice = resp.choices[0]
    assert "Paris" in choice.text
    assert choice.text.startswith(" ")
    assert choice.finish_reason == "length"
    assert resp.object == "text_completion"
    assert resp.usage is not None and resp.usage.completion_tokens == 5
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 5


def test_completion_echo_streaming_and_prompt_lists(client: openai.OpenAI) -> None:
    """``echo`` puts the prompt first; streaming gives the same text; a list of prompts with
    ``n: 2`` gives prompt-major choices, and usage counts each prompt once."""
    full = client.completions.create(
        model="m", prompt=FRANCE, max_tokens=4, temperature=0, echo=True
    )
    assert full.choices[0].text.startswith(FRANCE + " ")
    chunks = list(
        client.completions.create(
            model="m",
            prompt=FRANCE,
            max_tokens=4,
            temperature=0,
            echo=True,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    many = client.completions.create(
        model="m", prompt=[FRANCE, "1, 2, 3,"], max_tokens=3, temperature=0, n=2
    )
    texts = [c.text for c in sorted(many.choices, key=lambda c: c.index)]
    assert texts[0] == texts[1] == full.choices[0].text.removeprefix(FRANCE)[: len(texts[0])]
    assert texts[2] == texts[3] != texts[0]
    assert many.usage is not None and many.usage.completion_tokens == 12
    one = client.completions.create(model="m", prompt="1, 2, 3,", max_tokens=1)
    assert one.usage is not None and full.usage is not None
    assert many.usage.prompt_tokens == full.usage.prompt_tokens + one.usage.prompt_tokens


def test_completion_token_id_prompt(client: openai.OpenAI) -> None:
    """A prompt of token ids is used as it is."""
    text = client.completions.create(model="m", prompt=FRANCE, max_tokens=3, temperature=0)
    ids = client.completions.create(
        model="m", prompt=[504, 3575, 282, 4649, 314], max_tokens=3, temperature=0, echo=True
    )
    assert ids.choices[0].text == FRANCE + text.choices[0].text


STORY = [{"role": "user", "content": "Tell me a story about a dragon."}]


def test_chat_n_choices(client: openai.OpenAI) -> None:
    """``n: 3`` gives three choices: identical at temperature 0, and (streamed, each chunk with
    its ``index``) the same as non-streamed; at temperature 1 with a seed they differ; usage
    counts every choice's tokens and the prompt once, prefilled once (the choices start from
    the prompt cache: all but the last prompt token are cached)."""
    greedy = client.chat.completions.create(
        model="m", messages=STORY, n=3, temperature=0, max_tokens=8
    )
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    texts = {c.message.content for c in greedy.choices}
    assert len(texts) == 1
    assert greedy.usage is not None and greedy.usage.completion_tokens == 24
    details = greedy.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens == greedy.usage.prompt_tokens - 1
    streamed: dict[int, str] = {}
    for chunk in client.chat.completions.create(
        model="m", messages=STORY, n=3, temperature=0, max_tokens=8, stream=True
    ):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
    assert streamed == dict.fromkeys(range(3), greedy.choices[0].message.content)
    sampled = client.chat.completions.create(
        model="m", messages=STORY, n=3, temperature=1, seed=7, max_tokens=8
    )
    assert len(sampled.choices) == 3
    assert len({c.message.content for c in sampled.choices}) > 1
    assert sampled.usage is not None
    assert sampled.usage.prompt_tokens == greedy.usage.prompt_tokens


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"messages": STORY, "n": 0}, "n"),
        ("/v1/chat/completions", {"messages": STORY, "n": 17}, "n"),
        ("/v1/completions", {"prompt": FRANCE, "n": 0}, "n"),
        ("/v1/completions", {"prompt": []}, "prompt"),
        ("/v1/completions", {"prompt": ""}, "prompt"),
        ("/v1/completions", {"prompt": [10**9]}, "prompt"),
        ("/v1/completions", {"prompt": [FRANCE] * 9, "n": 2}, "n"),
        ("/v1/completions", {"prompt": FRANCE, "best_of": 3}, "best_of"),
        ("/v1/completions", {"prompt": FRANCE, "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {}, "prompt"),
    ],
)
def test_bad_choice_and_prompt_values_are_400(
    http: httpx.Client, path: str, body: dict[str, Any], param: str
) -> None:
    """Out-of-range ``n``, empty or unknown prompts and unsupported fields are 400s naming
    the parameter."""
    err = assert_openai_error(http.post(path, json=body), 400)
    assert err["param"] == param
