"""The conversation store (SQLite in tmp_path) and the chained-history rebuild, no daemon."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from mlxd.conversations.items import build_messages, normalize_input
from mlxd.conversations.store import Store, StoreDamaged, StoredResponse
from mlxd.errors import BadRequest, PreviousResponseNotFound


def _turn(
    store: Store, rid: str, prev: str | None, text_in: str, text_out: str, **body: Any
) -> None:
    chain = store.begin_turn(prev)
    try:
        store.save(
            StoredResponse(
                id=rid,
                conversation_id=chain.conversation_id or f"conv_{rid}",
                previous_response_id=prev,
                created_at=0.0,
                input_items=normalize_input(text_in),
                body={
                    "id": rid,
                    "instructions": body.get("instructions"),
                    "output": [
                        {
                            "type": "message",
                            "role": "assistant",
                            "content": [{"type": "output_text", "text": text_out}],
                        }
                    ],
                },
            ),
            "m",
        )
    finally:
        store.end_turn(chain)


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = Store.open(tmp_path / "c.sqlite3")
    yield s
    s.close()


def test_database_is_wal(store: Store) -> None:
    """The store is a real SQLite file in WAL mode."""
    conn = sqlite3.connect(store.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_chain_is_rebuilt_root_first_and_branches_keep_their_context(store: Store) -> None:
    """begin_turn returns the ancestors root first; two children of one parent do not see
    each other, and both belong to the root's conversation."""
    _turn(store, "r1", None, "one", "ONE")
    _turn(store, "r2a", "r1", "two-a", "TWO-A")
    _turn(store, "r2b", "r1", "two-b", "TWO-B")
    chain = store.begin_turn("r2b")
    assert [t.id for t in chain.history] == ["r1", "r2b"]
    assert chain.conversation_id == "conv_r1"
    store.end_turn(chain)
    assert [t.id for t in store.begin_turn("r2a").history] == ["r1", "r2a"]
    assert store.counts()["conversations"] == 1


def test_rebuilt_prompt_uses_only_current_instructions(store: Store) -> None:
    """Earlier turns' instructions are not carried over; the history's inputs and outputs are,
    in order, followed by the new input."""
    _turn(store, "r1", None, "The secret word is banana.", "OK", instructions="OLD RULES")
    history = store.begin_turn("r1").history
    msgs = build_messages("NEW RULES", history, normalize_input("What is the secret word?"))
    assert msgs == [
        {"role": "system", "content": "NEW RULES"},
        {"role": "user", "content": "The secret word is banana."},
        {"role": "assistant", "content": "OK"},
        {"role": "user", "content": "What is the secret word?"},
    ]


def test_replayed_function_call_items_become_tool_messages() -> None:
    """function_call / function_call_output items map to assistant tool_calls and tool messages."""
    items = normalize_input(
        [
            {"role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
            {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"type": "reasoning", "summary": []},
        ]
    )
    assert all(i["id"] for i in items)
    msgs = build_messages(None, [], items)
    assert msgs[1]["tool_calls"][0]["function"] == {"name": "w", "arguments": "{}"}
    assert msgs[2] == {"role": "tool", "tool_call_id": "c1", "content": "sunny"}


@pytest.mark.parametrize(
    "bad", [[{"role": "robot", "content": "x"}], [{"type": "item_reference", "id": "x"}], [7]]
)
def test_bad_input_items_are_400(bad: list[Any]) -> None:
    """Unknown roles, unsupported item types and non-objects are BadRequest naming the item."""
    with pytest.raises(BadRequest) as err:
        normalize_input(bad)
    assert err.value.param is not None and err.value.param.startswith("input[0]")


def test_unknown_and_deleted_ids_are_not_found(store: Store) -> None:
    """An unknown or deleted previous id raises previous_response_not_found; get() hides deleted
    responses, but a child chained before the delete keeps its full context."""
    with pytest.raises(PreviousResponseNotFound):
        store.begin_turn("nope")
    _turn(store, "r1", None, "a", "b")
    _turn(store, "r2", "r1", "c", "d")
    assert store.delete("r1") is True
    assert store.delete("r1") is False
    assert store.get("r1") is None
    with pytest.raises(PreviousResponseNotFound):
        store.begin_turn("r1")
    assert [t.id for t in store.begin_turn("r2").history] == ["r1", "r2"]


def test_committed_rows_survive_an_unclosed_connection(tmp_path: Path) -> None:
    """What is committed is in the file even if the process never closes the store (a crash)."""
    path = tmp_path / "c.sqlite3"
    first = Store.open(path)
    _turn(first, "r1", None, "a", "b")
    second = Store.open(path)  # as a restarted process would, while the first is still open
    found = second.get("r1")
    assert found is not None and found.input_items[0]["content"][0]["text"] == "a"
    second.close()
    first.close()


def test_damaged_file_is_refused_and_left_untouched(tmp_path: Path) -> None:
    """A file that is not a SQLite database raises StoreDamaged naming the file and the fix,
    and its bytes are not changed."""
    path = tmp_path / "c.sqlite3"
    garbage = b"this is not a database" * 100
    path.write_bytes(garbage)
    with pytest.raises(StoreDamaged) as err:
        Store.open(path)
    assert str(path) in str(err.value) and "Hint" in str(err.value)
    assert path.read_bytes() == garbage


def test_pinned_conversation_does_not_expire(store: Store) -> None:
    """A conversation with a generation in flight is not offered for archiving until the
    turn ends."""
    _turn(store, "r1", None, "a", "b")
    chain = store.begin_turn("r1", now=0.0)
    assert store.expired(older_than=1e12, now=1.0) == []
    store.end_turn(chain)
    assert store.expired(older_than=1e12, now=1.0) == ["conv_r1"]


def test_full_disk_is_a_storage_error_naming_the_cause(tmp_path: Path) -> None:
    """A write that SQLite cannot complete (here: the database may not grow, as on a full
    disk) raises StorageFailed (500 storage_error) naming the file and SQLite's reason; it
    used to surface as an anonymous 500 / a stream without a terminal event."""
    from mlxd.errors import StorageFailed

    store = Store.open(tmp_path / "c.sqlite3")
    pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
    store._conn.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(StorageFailed) as err:
        _turn(store, "r1", None, "x" * 200_000, "y")
    assert err.value.status == 500 and err.value.code == "storage_error"
    assert "full" in err.value.message and str(tmp_path) in err.value.message
    store._conn.execute(f"PRAGMA max_page_count = {pages * 1000}")
    _turn(store, "r2", None, "small", "ok")  # the store works again once there is room
    assert store.get("r2") is not None
    store.close()


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_database_file_deleted_or_replaced_refuses_writes(tmp_path: Path, how: str) -> None:
    """When the path no longer names the open file, writes are refused loudly (they used to
    succeed into the unlinked file and vanish at the next start)."""
    from mlxd.errors import StorageFailed

    path = tmp_path / "c.sqlite3"
    store = Store.open(path)
    _turn(store, "r1", None, "a", "b")
    for f in tmp_path.glob("c.sqlite3*"):
        f.unlink()
    if how == "replaced":
        path.write_bytes(b"")
    with pytest.raises(StorageFailed, match="deleted or replaced"):
        _turn(store, "r2", None, "c", "d")
    store.close()
