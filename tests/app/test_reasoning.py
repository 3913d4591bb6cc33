"""Reasoning (``<think>``) exposure in both APIs, in-process with a scripted fake engine.

The bundled SmolLM2 does not think, so the unit tier scripts what a thinking model emits: the
fake engine feeds fixed text pieces through the real :class:`TextFilter` (the engine's own
think-tag handling) and sends the same ``Delta`` / ``Finished`` events the real engine does.
One end-to-end test checks that with the real model nothing reasoning-shaped appears.
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from mlxd.api.app import create_app
from mlxd.api.context import AppState
from mlxd.config import Settings
from mlxd.conversations.store import Store
from mlxd.engine.core import Delta, Finished, GenerationRequest, JobHandle
from mlxd.engine.protocol import EngineStatus
from mlxd.engine.textfilter import TextFilter

PIECES = ["<think>", "The user", " wants", " a greeting.", "</think>", "\n\n", "Hello", "!"]


class FakeTokenizer:
    chat_template = "fake"
    has_tool_calling = False

    def apply_chat_template(self, messages: list[dict[str, Any]], **_: Any) -> str:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages)

    def encode(self, text: str, **_: Any) -> list[int]:
        return list(range(len(text.split())))

    def get_vocab(self) -> dict[str, int]:
        return {"hello": 0, "world": 1}


@dataclass
class FakeModel:
    id: str = "thinker"
    context_length: int = 4096
    dtype: str = "float32"
    load_seconds: float = 0.1
    created: int = 0
    tokenizer: FakeTokenizer = field(default_factory=FakeTokenizer)

    def describe(self) -> dict[str, Any]:
        return {"id": self.id}


@dataclass
class ScriptedEngine:
    """Engine stand-in: every job 'generates' PIECES, one piece per decoding step."""

    pieces: list[str]
    current: FakeModel = field(default_factory=FakeModel)
    state: str = "ready"
    device: dict[str, str] = field(default_factory=lambda: {"device": "cpu"})
    load_error: str | None = None
    group: Any = None  # not a process group (mlxd.engine.distributed)

    def require_model(self) -> FakeModel:
        return self.current

    def acquire(self, model_id: str) -> Future[FakeModel]:
        """Every configured name is answered by the one scripted model, loaded already."""
        fut: Future[FakeModel] = Future()
        fut.set_result(self.current)
        return fut

    def set_keep_alive(self, model_id: str, seconds: float) -> None:
        """Residency is not what these tests are about."""

    def models(self) -> tuple[Any, ...]:
        return ()

    def status(self) -> EngineStatus:
        return EngineStatus(state=self.state)

    def queue_depth(self) -> int:
        return 0

    def active_count(self) -> int:
        return 0

    def cache_status(self) -> dict[str, dict[str, Any]]:
        return {}

    def submit(self, request: GenerationRequest) -> JobHandle:
        """Like the engine: one piece per decoding step; steps that start or end inside
        <think> are counted as reasoning tokens."""
        job = JobHandle(1, request, asyncio.get_running_loop(), lambda _: None)
        text = TextFilter(stop=list(request.params.stop), reasoning=request.reasoning_mode)
        thinking = 0
        pieces = []
        for p in self.pieces:
            before = text.in_think
            pieces.append(text.feed(p))
            thinking += before or text.in_think
        for piece in [*pieces, text.finish()]:
            if piece.content or piece.reasoning:
                job.deliver(Delta(piece.content, piece.reasoning))
        job.deliver(
            Finished("stop", len(request.prompt), len(self.pieces), reasoning_tokens=thinking)
        )
        return job


def make_app(tmp_path: Path, mode: str) -> Any:
    settings = Settings(model={"reasoning": mode})
    store = Store.open(tmp_path / "responses.db")
    engine = ScriptedEngine(PIECES)
    return create_app(AppState(settings=settings, engine=engine, store=store))  # type: ignore[arg-type]


def post(app: Any, path: str, body: dict[str, Any]) -> tuple[int, str]:
    async def go() -> tuple[int, str]:
        client = app.test_client()
        resp = await client.post(path, json=body)
        return resp.status_code, str(await resp.get_data(as_text=True))

    return asyncio.run(asyncio.wait_for(go(), 20))


def sse_json(text: str) -> list[dict[str, Any]]:
    return [
        json.loads(line[6:])
        for line in text.splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}
RESP = {"model": "m", "input": "Hi"}


def test_chat_separate_exposes_reasoning_content(tmp_path: Path) -> None:
    """reasoning = separate: the think text is message.reasoning_content, the content is only
    the answer, and usage counts the reasoning-only decoding steps as reasoning tokens."""
    status, text = post(make_app(tmp_path, "separate"), "/v1/chat/completions", CHAT)
    assert status == 200
    resp = ChatCompletion.model_validate_json(text)
    message = resp.choices[0].message
    assert message.content == "Hello!"
    assert json.loads(text)["choices"][0]["message"]["reasoning_content"] == (
        "The user wants a greeting."
    )
    assert resp.usage is not None and resp.usage.completion_tokens_details is not None
    assert 1 <= (resp.usage.completion_tokens_details.reasoning_tokens or 0) <= len(PIECES)


def test_chat_stream_reasoning_deltas_then_content(tmp_path: Path) -> None:
    """Streaming: reasoning_content deltas come before content deltas, every chunk parses with
    the SDK's chunk type, and the joined parts equal the non-streaming fields."""
    app = make_app(tmp_path, "separate")
    status, text = post(app, "/v1/chat/completions", {**CHAT, "stream": True})
    assert status == 200
    frames = sse_json(text)
    for f in frames:
        ChatCompletionChunk.model_validate(f)
    deltas = [f["choices"][0]["delta"] for f in frames if f["choices"]]
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    content = "".join(d.get("content") or "" for d in deltas)
    assert (reasoning, content) == ("The user wants a greeting.", "Hello!")
    first_content = next(i for i, d in enumerate(deltas) if d.get("content"))
    assert all("reasoning_content" not in d for d in deltas[first_content:])


@pytest.mark.parametrize(("mode", "content"), [("strip", "Hello!"), ("inline", "".join(PIECES))])
def test_chat_strip_and_inline(tmp_path: Path, mode: str, content: str) -> None:
    """strip drops the think block; inline leaves it in the content; neither sends
    reasoning_content."""
    _, text = post(make_app(tmp_path, mode), "/v1/chat/completions", CHAT)
    message = json.loads(text)["choices"][0]["message"]
    assert message["content"] == content
    assert "reasoning_content" not in message


def test_responses_reasoning_item(tmp_path: Path) -> None:
    """Responses: a reasoning item (rs_, summary [], content [reasoning_text]) comes before
    the message item; the body parses as the SDK's Response; reasoning tokens are counted."""
    status, text = post(make_app(tmp_path, "separate"), "/v1/responses", RESP)
    assert status == 200
    resp = Response.model_validate_json(text)
    assert [o.type for o in resp.output] == ["reasoning", "message"]
    item = resp.output[0]
    assert item.type == "reasoning" and item.id.startswith("rs_")
    assert item.summary == []
    assert item.content is not None
    assert [(c.type, c.text) for c in item.content] == [
        ("reasoning_text", "The user wants a greeting.")
    ]
    assert resp.output_text == "Hello!"
    assert resp.usage is not None and resp.usage.output_tokens_details.reasoning_tokens >= 1


def test_responses_stream_reasoning_events(tmp_path: Path) -> None:
    """Streaming Responses: reasoning item added, reasoning_text deltas and done, then the
    message item; every event parses as an SDK stream event, sequence numbers count up, and
    the completed response equals the non-streamed shape."""
    status, text = post(make_app(tmp_path, "separate"), "/v1/responses", {**RESP, "stream": True})
    assert status == 200
    events = sse_json(text)
    adapter: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
    for e in events:
        adapter.validate_python(e)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    kinds = [e["type"] for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert events[2]["item"]["type"] == "reasoning"
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
    done = next(e for e in events if e["type"] == "response.reasoning_text.done")
    assert deltas == done["text"] == "The user wants a greeting."
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    final = Response.model_validate(events[-1]["response"])
    assert [o.type for o in final.output] == ["reasoning", "message"]
    assert final.output_text == "Hello!"


def test_responses_strip_has_no_reasoning_item(tmp_path: Path) -> None:
    """reasoning = strip: only the message item, without the think text."""
    _, text = post(make_app(tmp_path, "strip"), "/v1/responses", RESP)
    resp = Response.model_validate_json(text)
    assert [o.type for o in resp.output] == ["message"]
    assert resp.output_text == "Hello!"
