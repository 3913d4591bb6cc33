"""Process lifecycle against the real daemon: orderly SIGTERM, shutdown budget, failed loads."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from typing import Any

import httpx2 as httpx
import openai
import pytest

from conftest import Daemon

COUNT = [{"role": "user", "content": "Count from 1 to 500, separated by commas."}]
PARIS = [{"role": "user", "content": "What is the capital of France?"}]
#: What the service files allow beyond server.shutdown_timeout_seconds before they kill.
SERVICE_GRACE = 10.0


def events(d: Daemon) -> list[dict[str, Any]]:
    """Every log line, parsed; each must be a JSON object with timestamp, level and event."""
    out = []
    for line in d.log_path.read_text().splitlines():
        if line.strip():
            obj = json.loads(line)
            assert {"timestamp", "level", "event"} <= obj.keys(), line
            out.append(obj)
    return out


def stream_in_thread(
    d: Daemon, messages: list[dict[str, str]], max_tokens: int
) -> tuple[concurrent.futures.Future[tuple[str, str | None]], threading.Event]:
    """Start a streaming request; returns (its future, an event set at the first chunk).
    The future gives (text, finish_reason) or raises the SDK's error."""
    first = threading.Event()
    client = d.client(timeout=60.0)

    def run() -> tuple[str, str | None]:
        text, finish = [], None
        try:
            stream = client.chat.completions.create(
                model="m", messages=messages, max_tokens=max_tokens, stream=True, temperature=0
            )
            for chunk in stream:
                first.set()
                if chunk.choices:
                    text.append(chunk.choices[0].delta.content or "")
                    finish = chunk.choices[0].finish_reason or finish
        finally:
            first.set()
        return "".join(text), finish

    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(run)
    pool.shutdown(wait=False)
    return future, first


def sigterm_and_wait(d: Daemon, budget: float) -> int:
    """SIGTERM, then the exit status; the process must be gone within the documented budget."""
    d.process.send_signal(signal.SIGTERM)
    try:
        return d.process.wait(budget + SERVICE_GRACE)
    except subprocess.TimeoutExpired:
        limit = budget + SERVICE_GRACE
        raise AssertionError(f"daemon still running {limit}s after SIGTERM") from None


def test_sigterm_lets_inflight_stream_finish(start_daemon: Callable[..., Daemon]) -> None:
    """SIGTERM during a stream: the stream completes normally, the process exits 0 within the
    budget, and the log shows server.stopping ... request.completed ... server.stopped."""
    d = start_daemon()
    future, first = stream_in_thread(d, COUNT, max_tokens=16)
    assert first.wait(60), "no first chunk"
    assert sigterm_and_wait(d, 20.0) == 0
    text, finish = future.result(timeout=5)
    assert finish in ("stop", "length") and text
    names = [e["event"] for e in events(d)]
    stopping, stopped = names.index("server.stopping"), names.index("server.stopped")
    chat_done = max(
        i
        for i, e in enumerate(events(d))
        if e["event"] == "request.completed" and e["path"] == "/v1/chat/completions"
    )
    assert stopping < chat_done < stopped
    assert "server.cancelling_requests" not in names


def test_shutdown_budget_ends_long_stream_with_error_frame(
    start_daemon: Callable[..., Daemon],
) -> None:
    """With shutdown_timeout_seconds = 2, a generation still running after the budget ends with
    an error frame that says mlxd is shutting down (not a cut connection); exit status 0."""
    d = start_daemon("[server]\nshutdown_timeout_seconds = 2\n")
    future, first = stream_in_thread(d, COUNT, max_tokens=2000)
    assert first.wait(60), "no first chunk"
    assert sigterm_and_wait(d, 2.0) == 0
    with pytest.raises(openai.APIError, match="shutting down"):
        future.result(timeout=5)
    log = events(d)
    names = [e["event"] for e in log]
    assert names.index("server.stopping") < names.index("server.cancelling_requests")
    assert names.index("server.cancelling_requests") < names.index("server.stopped")
    chat = [e for e in log if e["event"] == "request.completed" and e.get("stream")]
    assert chat and chat[-1]["status"] == 503 and chat[-1]["error"] == "model_unavailable"


def test_failed_model_load_keeps_daemon_up_until_config_is_fixed(
    start_daemon: Callable[..., Daemon],
) -> None:
    """A model path that does not exist: the daemon stays up, /health is 503 with the error and
    chat gets a clear 503; fixing the config file loads the model without a restart."""
    d = start_daemon('[model]\npath = "/nonexistent/model-dir"\n', wait=False)
    resp = d.wait_load_failed()
    body = resp.json()
    assert resp.status_code == 503 and "/nonexistent/model-dir" in body["error"]
    with httpx.Client(base_url=d.base_url, timeout=10) as http:
        chat = http.post("/v1/chat/completions", json={"messages": PARIS})
    assert chat.status_code == 503 and "could not be loaded" in chat.json()["error"]["message"]

    tmp = d.config_path.with_name("fixed.toml")
    tmp.write_text("")  # the bundled default model
    os.replace(tmp, d.config_path)
    health = d.wait_ready()
    assert health["model"]["id"] == "SmolLM2-135M-Instruct"
    assert health["last_reload"]["ok"] is True
    assert health["last_reload"]["changed"] == ["model.path"]
    assert sigterm_and_wait(d, 20.0) == 0
    names = [e["event"] for e in events(d)]
    assert names.count("server.starting") == 1 and "model.load_failed" in names
