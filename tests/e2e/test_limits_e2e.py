"""Limits on the real daemon: body size, max_tokens cap, context length, wait queue, time limit.

Each limit ends a request with an OpenAI-shaped error (or ``finish_reason: "length"`` for the
time limit) and leaves the daemon serving.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx2 as httpx
import openai
import pytest

from conftest import Daemon, assert_openai_error, running_daemon, wait_until

pytestmark = pytest.mark.e2e

MSG = [{"role": "user", "content": "Say hi."}]
LONG = [{"role": "user", "content": "Write a very long story about a dragon."}]


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """Small body limit, max_tokens cap and per-request time limit."""
    config = (
        "[server]\nmax_body_bytes = 4096\nmax_tokens_limit = 1000\nrequest_timeout_seconds = 0.5\n"
    )
    with running_daemon(tmp_path_factory.mktemp("limited"), config) as d:
        yield d


@pytest.fixture(scope="module")
def single_slot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One generation at a time and one waiting request at most."""
    config = "[engine]\nmax_batch_size = 1\nmax_queue = 1\n"
    with running_daemon(tmp_path_factory.mktemp("single"), config) as d:
        yield d


# -- body size -------------------------------------------------------------------------------
def test_body_over_configured_limit_is_413(limited: Daemon) -> None:
    """A body above server.max_body_bytes gets 413 request_too_large; the next request works."""
    big = {"messages": [{"role": "user", "content": "a" * 5000}]}
    with limited.http() as http:
        err = assert_openai_error(http.post("/v1/chat/completions", json=big), 413)
        assert err["code"] == "request_too_large"
        assert "max_body_bytes" in err["message"]
        ok = http.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 2})
        assert ok.status_code == 200


def test_chunked_body_over_limit_is_413(limited: Daemon) -> None:
    """A chunked body (no Content-Length) is cut off at the limit too, not read to the end."""

    def chunks() -> Iterator[bytes]:
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(64):
            yield b"a" * 1024
        yield b'"}]}'

    with limited.http() as http:
        resp = http.post(
            "/v1/chat/completions",
            content=chunks(),
            headers={"content-type": "application/json"},
        )
    assert_openai_error(resp, 413)


# -- max_tokens ------------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_above_cap_is_400(limited: Daemon, field: str) -> None:
    """max_tokens above server.max_tokens_limit is a 400 naming the parameter and the key."""
    with limited.http() as http:
        resp = http.post("/v1/chat/completions", json={"messages": MSG, field: 1001})
    err = assert_openai_error(resp, 400)
    assert err["param"] == field
    assert "max_tokens_limit" in err["message"]


def test_max_output_tokens_above_cap_is_400(limited: Daemon) -> None:
    """The Responses API applies the same cap to max_output_tokens."""
    with limited.http() as http:
        resp = http.post("/v1/responses", json={"input": "hi", "max_output_tokens": 1001})
    if resp.status_code == 404 and "no route" in resp.text:
        pytest.skip("the Responses API is not present")
    err = assert_openai_error(resp, 400)
    assert err["param"] == "max_output_tokens"


# -- time limit ------------------------------------------------------------------------------
def test_time_limit_ends_generation_with_length(limited: Daemon) -> None:
    """A generation running past request_timeout_seconds ends with finish_reason 'length'."""
    resp = limited.client().chat.completions.create(
        model="m",
        messages=LONG,
        max_tokens=1000,
        temperature=0,  # type: ignore[arg-type]
    )
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens < 1000


def test_time_limit_ends_stream_with_length(limited: Daemon) -> None:
    """A stream past the time limit ends cleanly: a 'length' chunk, then [DONE]."""
    stream = limited.client().chat.completions.create(
        model="m",
        messages=LONG,
        max_tokens=1000,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
    )
    reasons = [c.choices[0].finish_reason for c in stream if c.choices]
    assert reasons[-1] == "length"


# -- context length --------------------------------------------------------------------------
def test_100k_token_prompt_is_context_length_exceeded(shared_daemon: Daemon) -> None:
    """A ~100,000-token prompt is refused with 400 context_length_exceeded before generating.

    The time taken is printed (run with -s) for the README; no timing is asserted.
    """
    prompt = "hello " * 100_000  # about 100,000 tokens for SmolLM2's tokenizer
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 5}
    with shared_daemon.http(timeout=60) as http:
        start = time.perf_counter()
        resp = http.post("/v1/chat/completions", json=body)
        elapsed = time.perf_counter() - start
        err = assert_openai_error(resp, 400)
        assert err["code"] == "context_length_exceeded"
        assert err["param"] == "messages"
        assert "maximum context length is 8192" in err["message"]
        print(f"\n100k-token prompt rejected in {elapsed:.3f} s")
        resp2 = http.post("/v1/responses", json={"input": prompt, "max_output_tokens": 5})
        if resp2.status_code != 404:
            assert assert_openai_error(resp2, 400)["code"] == "context_length_exceeded"
        assert http.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 2}).is_success


def test_prompt_just_over_context_is_rejected(shared_daemon: Daemon) -> None:
    """A prompt only slightly over the context (no cheap shortcut can tell) is still refused."""
    prompt = "hello " * 8300
    with shared_daemon.http(timeout=60) as http:
        resp = http.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": prompt}], "max_tokens": 5},
        )
    assert assert_openai_error(resp, 400)["code"] == "context_length_exceeded"


# -- wait queue ------------------------------------------------------------------------------
def first_text(lines: Iterator[str]) -> str:
    """Read SSE frames until one carries generated text; returns it. The caller keeps
    ``lines`` referenced: a dropped line iterator closes the connection."""
    for line in lines:
        if line.startswith("data: {"):
            choices = json.loads(line[6:]).get("choices") or [{}]
            text = choices[0].get("delta", {}).get("content")
            if text:
                return str(text)
    raise AssertionError("the stream ended without text")


def _wait_for(http: httpx.Client, key: str, value: int, timeout: float = 60.0) -> None:
    wait_until(
        lambda: http.get("/health").json()[key] == value,
        timeout,
        f"/health {key} to reach {value}",
        interval=0.05,
    )


def test_full_queue_is_503_with_retry_after(single_slot: Daemon) -> None:
    """With one slot busy and one request waiting, the next request gets 503 overloaded with
    Retry-After; the waiting one is served once the slot frees."""
    waiter: dict[str, Any] = {}

    def wait_in_queue() -> None:
        with single_slot.http(timeout=120) as h:
            waiter["resp"] = h.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 3})

    with single_slot.http(timeout=120) as http:
        long_body = {"messages": LONG, "max_tokens": 2000, "temperature": 0, "stream": True}
        with http.stream("POST", "/v1/chat/completions", json=long_body) as stream:
            lines = stream.iter_lines()
            first_text(lines)  # generated text arrived: the slot is taken
            thread = threading.Thread(target=wait_in_queue, daemon=True)
            thread.start()
            _wait_for(http, "queue_depth", 1)
            over = http.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 3})
            err = assert_openai_error(over, 503)
            assert err["code"] == "overloaded"
            assert int(over.headers["retry-after"]) > 0
            with pytest.raises(openai.InternalServerError) as sdk_err:
                single_slot.client().chat.completions.create(
                    model="m",
                    messages=MSG,
                    max_tokens=3,  # type: ignore[arg-type]
                )
            assert sdk_err.value.status_code == 503
        # Leaving the stream closes it: the long generation is cancelled, the waiter runs.
        thread.join(120)
    assert waiter["resp"].status_code == 200, waiter["resp"].text
    assert waiter["resp"].json()["choices"][0]["finish_reason"] in ("stop", "length")
