"""Per-token logprobs in Chat Completions, Responses and completions (real daemon, OpenAI SDK)."""

from __future__ import annotations

import math
from typing import Any

import httpx2 as httpx
import openai
import pytest

from conftest import assert_openai_error

PARIS = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_logprobs_greedy_streamed_and_not(client: openai.OpenAI) -> None:
    """At temperature 0 every token is the most likely of its top 3 (its logprob is the
    largest, exp(logprob) <= 1), the tokens spell the content, and streaming gives the same
    tokens and values; with n=2 each choice has its own."""
    resp = client.chat.completions.create(
        model="m", messages=PARIS, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3
    )
    choice = resp.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    tokens = choice.logprobs.content
    for t in tokens:
        assert len(t.top_logprobs) == 3
        assert t.logprob == max(a.logprob for a in t.top_logprobs)
        assert math.exp(t.logprob) <= 1
        assert t.bytes is not None and bytes(t.bytes).decode() == t.token
    assert "".join(t.token for t in tokens).strip() == (choice.message.content or "").strip()
    streamed = []
    for chunk in client.chat.completions.create(
        model="m",
        messages=PARIS,
        temperature=0,
        max_tokens=8,
        logprobs=True,
        top_logprobs=3,
        stream=True,
    ):
        for c in chunk.choices:
            if c.logprobs is not None and c.logprobs.content:
                streamed += c.logprobs.content
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in tokens]
    two = client.chat.completions.create(
        model="m", messages=PARIS, temperature=0, max_tokens=4, logprobs=True, n=2
    )
    for c in two.choices:
        assert c.logprobs is not None and c.logprobs.content
        assert all(t.top_logprobs == [] for t in c.logprobs.content)
    plain = client.chat.completions.create(model="m", messages=PARIS, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_responses_output_text_logprobs(client: openai.OpenAI) -> None:
    """``include: ["message.output_text.logprobs"]`` puts each token on the output text;
    the streamed deltas carry the same tokens as the final part."""
    kwargs: dict[str, Any] = {
        "model": "m",
        "input": "What is the capital of France?",
        "temperature": 0,
        "max_output_tokens": 8,
        "include": ["message.output_text.logprobs"],
        "top_logprobs": 2,
        "store": False,
    }
    resp = client.responses.create(**kwargs)
    part = resp.output[0].content[0]
    assert part.type == "output_text" and part.logprobs
    assert all(len(t.top_logprobs) == 2 for t in part.logprobs)
    assert "".join(t.token for t in part.logprobs).strip() == part.text.strip()
    deltas: list[Any] = []
    final: list[Any] = []
    for event in client.responses.create(**kwargs, stream=True):
        if event.type == "response.output_text.delta":
            deltas += event.logprobs or []
        elif event.type == "response.output_text.done":
            final = list(event.logprobs or [])
    assert [t.token for t in deltas] == [t.token for t in final] == [t.token for t in part.logprobs]


def test_completion_logprobs(client: openai.OpenAI) -> None:
    """The completions API's ``logprobs: k`` gives parallel token lists whose text is the
    choice's, at most k alternatives each, offsets into the text; streaming agrees."""
    resp = client.completions.create(
        model="m", prompt="The capital of France is", max_tokens=5, temperature=0, logprobs=2
    )
    choice = resp.choices[0]
    lp = choice.logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert "".join(lp.tokens) == choice.text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(
        len(top) <= 2 and max(top.values()) == v
        for top, v in zip(lp.top_logprobs, lp.token_logprobs, strict=True)
    )
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    streamed: list[str] = []
    for chunk in client.completions.create(
        model="m",
        prompt="The capital of France is",
        max_tokens=5,
        temperature=0,
        logprobs=2,
        stream=True,
    ):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.tokens or []
    assert streamed == lp.tokens


def test_echo_with_logprobs_scores_the_prompt(client: openai.OpenAI) -> None:
    """``echo`` with ``logprobs`` (lm-evaluation-harness's loglikelihood request) returns the
    prompt's tokens first, the first without a logprob; a prompt token's score equals the
    logprob the same token had when it was generated after the same text; streaming agrees."""
    prompt = [504, 3575, 282, 4649, 314]  # "The capital of France is"
    gen = client.completions.create(
        model="m", prompt=prompt, max_tokens=1, temperature=0, logprobs=1
    )
    glp = gen.choices[0].logprobs
    assert glp is not None and glp.token_logprobs and glp.tokens
    extended = client.completions.create(
        model="m", prompt=[*prompt, 7042], max_tokens=1, temperature=0, logprobs=1, echo=True
    )
    choice = extended.choices[0]
    lp = choice.logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs is not None and lp.top_logprobs
    assert len(lp.tokens) == len(prompt) + 2
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert "".join(lp.tokens) == choice.text
    assert lp.tokens[len(prompt)] == glp.tokens[0] == " Paris"
    assert abs(lp.token_logprobs[len(prompt)] - glp.token_logprobs[0]) < 1e-3
    streamed: list[str] = []
    for chunk in client.completions.create(
        model="m",
        prompt=[*prompt, 7042],
        max_tokens=1,
        temperature=0,
        logprobs=1,
        echo=True,
        stream=True,
    ):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.tokens or []
    assert streamed == lp.tokens


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (
            "/v1/chat/completions",
            {"messages": PARIS, "logprobs": True, "top_logprobs": 21},
            "top_logprobs",
        ),
        ("/v1/chat/completions", {"messages": PARIS, "top_logprobs": 2}, "top_logprobs"),
        ("/v1/responses", {"input": "hi", "top_logprobs": 21}, "top_logprobs"),
        ("/v1/completions", {"prompt": "hi", "logprobs": 6}, "logprobs"),
    ],
)
def test_bad_logprob_values_are_400(
    http: httpx.Client, path: str, body: dict[str, Any], param: str
) -> None:
    """Out-of-range alternatives, top_logprobs without logprobs and prompt scoring are 400s."""
    err = assert_openai_error(http.post(path, json=body), 400)
    assert err["param"] == param
