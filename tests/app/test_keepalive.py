"""Keep-alives while the engine is silent (a long prefill), per API, in-process.

Codex CLI resets its idle timer only on SSE *events*: a Responses stream must send
``response.in_progress`` events while it waits, not comments. Chat Completions keeps SSE
comments (its clients ignore them); Anthropic Messages sends ``ping`` events.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from test_reasoning import ScriptedEngine

from mlxd.api.app import create_app
from mlxd.api.context import AppState
from mlxd.config import Settings
from mlxd.conversations.store import Store
from mlxd.engine.core import Delta, Finished, GenerationRequest, JobHandle

SILENCE = 0.6  # seconds before the first token; the keep-alive interval is 0.05 s


class SlowEngine(ScriptedEngine):
    """Engine stand-in that says nothing for SILENCE seconds, then answers "Hello"."""

    def submit(self, request: GenerationRequest) -> JobHandle:
        job = JobHandle(1, request, asyncio.get_running_loop(), lambda _: None)

        def answer() -> None:
            job.deliver(Delta("Hello"))
            job.deliver(Finished("stop", len(request.prompt), 1))

        asyncio.get_running_loop().call_later(SILENCE, answer)
        return job


def stream(tmp_path: Path, path: str, body: dict[str, Any]) -> str:
    settings = Settings(server={"sse_keepalive_seconds": 0.05})
    store = Store.open(tmp_path / "responses.db")
    app = create_app(AppState(settings=settings, engine=SlowEngine([]), store=store))  # type: ignore[arg-type]

    async def go() -> str:
        resp = await app.test_client().post(path, json={**body, "stream": True})
        assert resp.status_code == 200
        return str(await resp.get_data(as_text=True))

    return asyncio.run(asyncio.wait_for(go(), 20))


def event_types(text: str) -> list[str]:
    return [ln.removeprefix("event: ") for ln in text.splitlines() if ln.startswith("event: ")]


def test_responses_sends_in_progress_events_while_waiting(tmp_path: Path) -> None:
    """Before the first token, repeated response.in_progress events (each a valid event with
    a growing sequence number), never comments; then the output and response.completed."""
    text = stream(tmp_path, "/v1/responses", {"model": "m", "input": "Hi"})
    kinds = event_types(text)
    first_output = kinds.index("response.output_item.added")
    assert kinds[0] == "response.created"
    assert kinds[1:first_output].count("response.in_progress") >= 3
    assert set(kinds[1:first_output]) == {"response.in_progress"}
    assert kinds[-1] == "response.completed"
    assert ": keepalive" not in text
    seqs = [json.loads(ln[6:])["sequence_number"] for ln in text.splitlines() if ln[:6] == "data: "]
    assert seqs == list(range(len(seqs)))


def test_chat_sends_comments_while_waiting(tmp_path: Path) -> None:
    """Chat Completions keeps SSE comments as its keep-alive."""
    text = stream(
        tmp_path,
        "/v1/chat/completions",
        {"model": "m", "messages": [{"role": "user", "content": "Hi"}]},
    )
    assert text.count(": keepalive") >= 3 and text.rstrip().endswith("data: [DONE]")


def test_messages_sends_pings_while_waiting(tmp_path: Path) -> None:
    """Anthropic Messages sends ping events while waiting, then the message."""
    text = stream(
        tmp_path,
        "/v1/messages",
        {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]},
    )
    kinds = event_types(text)
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds[: kinds.index("content_block_start")].count("ping") >= 3
