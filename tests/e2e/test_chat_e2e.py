"""Chat Completions against the real daemon, through the official OpenAI SDK."""

from __future__ import annotations

import concurrent.futures
import json

import httpx2 as httpx
import openai
import pytest

from conftest import Daemon

PARIS = [{"role": "user", "content": "What is the capital of France?"}]


def test_health_reports_model_and_backend(http: httpx.Client) -> None:
    """/health is 200 once ready and names the model, the backend device and the version."""
    body = http.get("/health").json()
    assert body["status"] == "ok"
    assert body["model"]["id"] == "SmolLM2-135M-Instruct"
    assert body["backend"]["device"] in ("cpu", "gpu")
    assert body["version"]


def test_models_list_and_get(client: openai.OpenAI) -> None:
    """/v1/models lists the served model; /v1/models/{id} returns it; unknown ids are 404."""
    models = client.models.list()
    assert [m.id for m in models.data] == ["SmolLM2-135M-Instruct"]
    assert client.models.retrieve("SmolLM2-135M-Instruct").id == "SmolLM2-135M-Instruct"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("org/no-such-model")
    assert err.value.code == "model_not_found"


def test_capital_of_france_non_streaming(client: openai.OpenAI) -> None:
    """The bundled model answers the capital question with Paris at temperature 0."""
    resp = client.chat.completions.create(model="any", messages=PARIS, temperature=0)
    choice = resp.choices[0]
    assert "Paris" in (choice.message.content or "")
    assert choice.finish_reason == "stop"
    assert resp.usage is not None and resp.usage.prompt_tokens > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.model == "SmolLM2-135M-Instruct"


def test_streaming_matches_non_streaming(client: openai.OpenAI) -> None:
    """Streaming yields the same text as non-streaming; include_usage adds a usage chunk."""
    full = client.chat.completions.create(model="m", messages=PARIS, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="m",
            messages=PARIS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens  # type: ignore[union-attr]
    assert len({c.id for c in chunks}) == 1


def test_stream_ends_with_done(http: httpx.Client) -> None:
    """The raw SSE stream is data-only frames ending with [DONE]; usage is null before the end."""
    body = {
        "messages": PARIS,
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        frames = [ln for ln in resp.iter_lines() if ln.startswith("data: ")]
    assert frames[-1] == "data: [DONE]"
    payloads = [json.loads(f[6:]) for f in frames[:-1]]
    assert all(p["usage"] is None for p in payloads[:-1])
    assert payloads[-1]["usage"]["completion_tokens"] <= 5


def test_max_tokens_cuts_with_length(client: openai.OpenAI) -> None:
    """max_completion_tokens bounds the completion and finish_reason says 'length'."""
    resp = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "Write a long story about a dragon."}],
        max_completion_tokens=4,
        temperature=0,
    )
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 4


def test_stop_sequence_never_leaks(client: openai.OpenAI) -> None:
    """A stop string ends the text before it; no part of it appears, streamed or not."""
    full = client.chat.completions.create(model="m", messages=PARIS, temperature=0)
    text = full.choices[0].message.content or ""
    assert "Paris" in text
    cut = client.chat.completions.create(model="m", messages=PARIS, temperature=0, stop=["Par"])
    assert cut.choices[0].message.content == text[: text.index("Par")]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="m", messages=PARIS, temperature=0, stop="Paris", stream=True
        )
        if c.choices
    )
    assert streamed == text[: text.index("Paris")]


def test_content_parts_and_null_content(client: openai.OpenAI) -> None:
    """Content as a list of text parts equals the same text as a string; null content is allowed."""
    parts = client.chat.completions.create(
        model="m",
        temperature=0,
        messages=[
            {"role": "system", "content": None},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is the capital "},
                    {"type": "text", "text": "of France?"},
                ],
            },
        ],
    )
    assert "Paris" in (parts.choices[0].message.content or "")


def test_seed_reproduces_sampling(client: openai.OpenAI) -> None:
    """The same seed at temperature 1 gives the same text twice."""

    def ask() -> str:
        r = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "Tell me a fun fact."}],
            temperature=1.0,
            seed=1234,
            max_tokens=20,
        )
        return r.choices[0].message.content or ""

    assert ask() == ask()


def test_four_concurrent_streams_are_coherent(shared_daemon: Daemon) -> None:
    """Four concurrent streams each get exactly the text they get alone (no cross-talk)."""
    client = shared_daemon.client()
    questions = [
        "What is the capital of France?",
        "What is 2 plus 2?",
        "Name a color of the sky.",
        "What animal says meow?",
    ]

    def alone(q: str) -> str:
        r = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": q}], temperature=0, max_tokens=24
        )
        return r.choices[0].message.content or ""

    def streamed(q: str) -> str:
        s = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": q}],
            temperature=0,
            max_tokens=24,
            stream=True,
        )
        return "".join(c.choices[0].delta.content or "" for c in s if c.choices)

    expected = [alone(q) for q in questions]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(streamed, questions))
    assert got == expected
    assert "Paris" in got[0]
