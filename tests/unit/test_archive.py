"""The archiver: expired conversations become one JSON file each, crash-safe, no daemon."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from mlxd.conversations import archive
from mlxd.conversations.items import normalize_input
from mlxd.conversations.store import Store, StoredResponse
from mlxd.errors import PreviousResponseNotFound


def _turn(store: Store, rid: str, prev: str | None, text: str, now: float) -> None:
    chain = store.begin_turn(prev, now=now)
    store.save(
        StoredResponse(
            id=rid,
            conversation_id=chain.conversation_id or f"conv_{rid}",
            previous_response_id=prev,
            created_at=now,
            input_items=normalize_input(text),
            body={
                "id": rid,
                "status": "completed",
                "model": "m",
                "instructions": f"rules {rid}",
                "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5},
                "output": [
                    {
                        "type": "message",
                        "role": "assistant",
                        "content": [{"type": "output_text", "text": f"out {rid}"}],
                    }
                ],
            },
        ),
        "m",
        now=now,
    )
    store.end_turn(chain)


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = Store.open(tmp_path / "c.sqlite3")
    _turn(s, "r1", None, "first", now=100.0)
    _turn(s, "r2", "r1", "second", now=101.0)
    yield s
    s.close()


def test_expired_conversation_becomes_one_json_file(store: Store, tmp_path: Path) -> None:
    """One file per conversation with id, model, timestamps and every turn in order (input,
    instructions, output text, usage); the rows are gone, the ids are tombstoned with a clear
    'expired' error, and no temporary file is left."""
    out = tmp_path / "archive"
    written = archive.sweep(store, out, ttl_seconds=10, now=200.0)
    assert written == [out / "conv_r1.json"]
    doc = json.loads(written[0].read_text())
    assert doc["conversation_id"] == "conv_r1" and doc["model"] == "m"
    assert doc["created_at"] and doc["last_activity_at"] and doc["archived_at"]
    turns = doc["turns"]
    assert [t["response_id"] for t in turns] == ["r1", "r2"]
    assert turns[1]["previous_response_id"] == "r1"
    assert turns[1]["input"][0]["content"][0]["text"] == "second"
    assert turns[1]["instructions"] == "rules r2"
    assert turns[1]["output_text"] == "out r2"
    assert turns[1]["usage"]["total_tokens"] == 5
    assert store.counts() == {"conversations": 0, "responses": 0, "archived": 2}
    with pytest.raises(PreviousResponseNotFound, match="expired"):
        store.begin_turn("r2")
    assert sorted(p.name for p in out.iterdir()) == ["conv_r1.json"]


def test_fresh_conversation_is_kept(store: Store, tmp_path: Path) -> None:
    """A conversation active within the TTL is not archived."""
    assert archive.sweep(store, tmp_path / "archive", ttl_seconds=1000, now=200.0) == []
    assert store.counts()["responses"] == 2


def test_crash_between_write_and_delete_gives_exactly_one_file(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the process dies after the archive file is written but before the rows are deleted
    (and mid-write of another temp file), the next sweep leaves exactly one complete file, no
    temp file, and removes the rows."""
    out = tmp_path / "archive"

    def crash(*_: Any, **__: Any) -> bool:
        raise KeyboardInterrupt("simulated crash")

    with monkeypatch.context() as m:
        m.setattr(Store, "remove_archived", crash)
        with pytest.raises(KeyboardInterrupt):
            archive.sweep(store, out, ttl_seconds=10, now=200.0)
    assert (out / "conv_r1.json").exists()
    assert store.counts()["responses"] == 2  # rows still there, as after a crash
    (out / ".conv_r1.json.999.tmp").write_text('{"half": ')  # a write cut by a crash
    written = archive.sweep(store, out, ttl_seconds=10, now=300.0)
    assert written == [out / "conv_r1.json"]
    assert sorted(p.name for p in out.iterdir()) == ["conv_r1.json"]
    assert len(json.loads(written[0].read_text())["turns"]) == 2
    assert store.counts()["responses"] == 0


def test_unwritable_archive_dir_keeps_conversations_and_retries(
    store: Store, tmp_path: Path
) -> None:
    """An archive dir that cannot be created (its parent is a regular file; root cannot write
    there either) logs conversations.archive_failed and keeps the rows; a later sweep to a
    usable directory archives them."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    with capture_logs() as logs:
        assert archive.sweep(store, blocker / "archive", ttl_seconds=10, now=200.0) == []
    failed = [e for e in logs if e["event"] == "conversations.archive_failed"]
    assert failed and failed[0]["conversation_id"] == "conv_r1"
    assert store.counts()["responses"] == 2
    assert archive.sweep(store, tmp_path / "ok", ttl_seconds=10, now=201.0) != []
    assert store.counts()["responses"] == 0


def test_activity_during_archiving_cancels_the_delete(store: Store, tmp_path: Path) -> None:
    """If a turn is added between reading the conversation and deleting it, the delete is
    skipped (the conversation stays live), so the new turn is never lost."""
    dump = store.dump("conv_r1")
    assert dump is not None
    _turn(store, "r3", "r2", "third", now=150.0)
    assert store.remove_archived(dump, tmp_path / "x.json", now=200.0) is False
    assert store.counts()["responses"] == 3


def test_record_with_lone_surrogate_is_archived_escaped_and_others_still_archive(
    tmp_path: Path,
) -> None:
    """A stored record holding a lone surrogate (accepted before the API refused them) used to
    make every sweep fail with UnicodeEncodeError, so nothing was archived again. Now it is
    written with \\u escapes (valid JSON, nothing lost) and the other conversations archive."""
    s = Store.open(tmp_path / "c.sqlite3")
    _turn(s, "bad", None, "lone \ud800 surrogate", now=100.0)
    _turn(s, "good", None, "fine", now=100.5)
    with capture_logs() as logs:
        written = archive.sweep(s, tmp_path / "archive", ttl_seconds=10, now=1000.0)
    s.close()
    assert len(written) == 2
    bad = next(p for p in written if "bad" in p.name)
    doc = json.loads(bad.read_text(encoding="ascii"))
    assert "lone \ud800 surrogate" in json.dumps(doc["turns"][0]["input"], ensure_ascii=False)
    assert [e["event"] for e in logs].count("conversations.archive_escaped") == 1
