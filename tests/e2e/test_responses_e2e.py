"""The Responses API against the real daemon, through the official OpenAI SDK."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from conftest import Daemon

# A model load can take a minute on a busy two-core machine; generations are kept short.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

SECRET = "The secret word is banana. Remember it."
QUESTION = "What is the secret word?"


def test_chained_turn_remembers_and_unchained_does_not(client: openai.OpenAI) -> None:
    """previous_response_id rebuilds the history: the second turn answers 'banana'; the same
    question without the id does not see the first turn (and has a shorter prompt)."""
    first = client.responses.create(model="m", input=SECRET, temperature=0, max_output_tokens=24)
    assert first.status == "completed" and first.id.startswith("resp_")
    chained = client.responses.create(
        model="m",
        previous_response_id=first.id,
        input=QUESTION,
        temperature=0,
        max_output_tokens=24,
    )
    alone = client.responses.create(model="m", input=QUESTION, temperature=0, max_output_tokens=24)
    assert "banana" in chained.output_text.lower()
    assert "banana" not in alone.output_text.lower()
    assert chained.previous_response_id == first.id
    assert chained.usage is not None and alone.usage is not None and first.usage is not None
    assert chained.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens


def test_every_response_key_is_sent(http: httpx.Client) -> None:
    """The JSON body carries every key of the Response object OPENAI_WIRE.md lists."""
    body = http.post(
        "/v1/responses",
        json={"model": "m", "input": "Hi", "max_output_tokens": 4, "metadata": {"k": "v"}},
    ).json()
    keys = {
        "id", "object", "created_at", "completed_at", "status", "error", "incomplete_details",
        "instructions", "max_output_tokens", "model", "output", "parallel_tool_calls",
        "previous_response_id", "reasoning", "store", "temperature", "top_p", "text",
        "tool_choice", "tools", "truncation", "usage", "metadata", "user",
    }  # fmt: skip
    assert keys <= body.keys()
    assert body["object"] == "response" and body["metadata"] == {"k": "v"}
    item = body["output"][0]
    assert item["id"].startswith("msg_") and item["type"] == "message"
    assert item["content"][0]["annotations"] == []


def test_max_output_tokens_cut_is_incomplete(client: openai.OpenAI) -> None:
    """A response cut by max_output_tokens is incomplete with reason max_output_tokens."""
    resp = client.responses.create(model="m", input="Tell me a long story.", max_output_tokens=3)
    assert resp.status == "incomplete"
    assert resp.incomplete_details is not None
    assert resp.incomplete_details.reason == "max_output_tokens"
    assert resp.usage is not None and resp.usage.output_tokens == 3


def test_stream_helper_final_response_matches_deltas(client: openai.OpenAI) -> None:
    """responses.stream() works; the final output_text equals the concatenated deltas, and the
    streamed response is stored like a non-streamed one."""
    with client.responses.stream(
        model="m", input="What is the capital of France?", temperature=0, max_output_tokens=30
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert final.output_text == deltas and "Paris" in deltas
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert client.responses.retrieve(final.id).output_text == deltas


def test_raw_stream_events_parse_and_stream_closes(http: httpx.Client) -> None:
    """Every frame is 'event: <type>' plus JSON of the same type that the SDK's event union
    parses; the documented order holds and the stream ends right after the terminal event."""
    adapter: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
    payloads = []
    body = {"model": "m", "input": "Hi", "stream": True, "max_output_tokens": 5}
    with http.stream("POST", "/v1/responses", json=body) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        event_type = None
        for line in resp.iter_lines():
            if line.startswith("event: "):
                event_type = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                assert data["type"] == event_type
                adapter.validate_python(data)
                payloads.append(data)
    types = [p["type"] for p in payloads]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert len({p["response"]["id"] for p in payloads if "response" in p}) == 1
    assert payloads[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_retrieve_delete_and_input_items(client: openai.OpenAI) -> None:
    """GET returns the stored object, input_items pages with after/limit/order/has_more,
    DELETE removes it (then 404 on GET and DELETE)."""
    items = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": [{"type": "input_text", "text": "three"}]},
    ]
    resp = client.responses.create(model="m", input=items, max_output_tokens=2)  # type: ignore[arg-type]
    assert client.responses.retrieve(resp.id).id == resp.id
    page = client.responses.input_items.list(resp.id, order="asc", limit=2)
    assert [i.content[0].text for i in page.data] == ["one", "two"]  # type: ignore[union-attr]
    assert page.has_more is True
    rest = client.responses.input_items.list(resp.id, order="asc", after=page.data[-1].id)
    assert [i.content[0].text for i in rest.data] == ["three"]  # type: ignore[union-attr]
    assert rest.has_more is False
    newest = client.responses.input_items.list(resp.id, limit=1)  # default order: desc
    assert newest.data[0].content[0].text == "three"  # type: ignore[union-attr]
    client.responses.delete(resp.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(resp.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(resp.id)


def test_store_false_is_not_retrievable(client: openai.OpenAI) -> None:
    """A store=false response is answered but cannot be retrieved or continued."""
    resp = client.responses.create(model="m", input="Hi", store=False, max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(resp.id)
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="m", input="x", previous_response_id=resp.id)
    assert err.value.code == "previous_response_not_found"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"input": "x", "previous_response_id": "resp_nope"}, "previous_response_not_found"),
        ({"input": 42}, "invalid_value"),
        ({"input": []}, "invalid_value"),
        ({"input": "x", "max_output_tokens": 0}, "invalid_value"),
        ({"input": [{"role": "user", "content": {"a": 1}}]}, "invalid_value"),
        ({}, "invalid_value"),
    ],
)
def test_bad_input_is_a_4xx_openai_error(
    http: httpx.Client, body: dict[str, Any], code: str
) -> None:
    """Bad requests get 400 with an OpenAI error body, never a 500."""
    resp = http.post("/v1/responses", json={"model": "m", **body})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == code


def test_unknown_id_is_404(http: httpx.Client) -> None:
    """GET, DELETE and input_items of an unknown id are 404 OpenAI errors."""
    for method, path in (
        ("GET", "/v1/responses/resp_nope"),
        ("DELETE", "/v1/responses/resp_nope"),
        ("GET", "/v1/responses/resp_nope/input_items"),
    ):
        resp = http.request(method, path)
        assert resp.status_code == 404 and resp.json()["error"]["type"] == "not_found_error"


@pytest.mark.timeout(400)  # three daemon starts on a shared machine
def test_responses_survive_sigterm_and_sigkill(start_daemon: Any, tmp_path: Path) -> None:
    """After SIGTERM, and separately after SIGKILL, a restart on the same state dir still
    serves every stored response, and chains continue from them."""
    state = tmp_path / "state"
    d1: Daemon = start_daemon(state_dir=state)
    c1 = d1.client()
    r1 = c1.responses.create(model="m", input=SECRET, temperature=0, max_output_tokens=4)
    r2 = c1.responses.create(
        model="m", previous_response_id=r1.id, input="And?", temperature=0, max_output_tokens=4
    )
    assert d1.stop(signal.SIGTERM) == 0

    d2: Daemon = start_daemon(state_dir=state)
    c2 = d2.client()
    assert c2.responses.retrieve(r1.id).output_text == r1.output_text
    assert c2.responses.retrieve(r2.id).previous_response_id == r1.id
    r3 = c2.responses.create(model="m", previous_response_id=r2.id, input="Ok", max_output_tokens=4)
    d2.process.send_signal(signal.SIGKILL)
    d2.process.wait(10)

    d3: Daemon = start_daemon(state_dir=state)
    c3 = d3.client()
    for r in (r1, r2, r3):
        assert c3.responses.retrieve(r.id).id == r.id
    r4 = c3.responses.create(model="m", previous_response_id=r3.id, input="Go", max_output_tokens=2)
    assert r4.usage is not None and r3.usage is not None
    assert r4.usage.input_tokens > r3.usage.input_tokens  # the whole chain is in the prompt


def test_expired_conversation_is_archived_live(start_daemon: Any) -> None:
    """With ttl_seconds = 2 and a 1 s sweep, a conversation becomes one valid JSON file with all
    its turns within seconds, leaves the live store, and continuing it says it expired."""
    d: Daemon = start_daemon("[conversations]\nttl_seconds = 2\nsweep_interval_seconds = 1\n")
    c = d.client()
    r1 = c.responses.create(model="m", input="Hello there", max_output_tokens=3)
    r2 = c.responses.create(model="m", previous_response_id=r1.id, input="Bye", max_output_tokens=3)
    archive_dir = d.state_dir / "conversation_logs"
    deadline = time.monotonic() + 20
    files: list[Path] = []
    while time.monotonic() < deadline and not files:
        time.sleep(0.5)
        files = sorted(archive_dir.glob("*.json")) if archive_dir.exists() else []
    assert len(files) == 1, d.stderr_tail()
    doc = json.loads(files[0].read_text())
    assert [t["response_id"] for t in doc["turns"]] == [r1.id, r2.id]
    assert doc["turns"][1]["output_text"] == r2.output_text
    assert sorted(p.name for p in archive_dir.iterdir()) == [files[0].name]  # no temp files
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(r1.id)
    with pytest.raises(openai.BadRequestError) as err:
        c.responses.create(model="m", previous_response_id=r2.id, input="more")
    assert err.value.code == "previous_response_not_found" and "expired" in str(err.value)
    conn = sqlite3.connect(d.state_dir / "conversations.sqlite3")
    assert conn.execute("SELECT count(*) FROM responses").fetchone()[0] == 0
    conn.close()


def test_damaged_database_refuses_to_start(start_daemon: Any, tmp_path: Path) -> None:
    """A damaged database file stops the daemon at start with status 1 and a message naming
    the file and the fix; the file is left byte for byte as it was."""
    state = tmp_path / "state"
    state.mkdir()
    db = state / "conversations.sqlite3"
    garbage = b"not a database " * 500
    db.write_bytes(garbage)
    d: Daemon = start_daemon(state_dir=state, wait=False)
    assert d.process.wait(60) == 1
    err = d.stderr_tail(20000)
    assert str(db) in err and "damaged" in err
    assert db.read_bytes() == garbage
