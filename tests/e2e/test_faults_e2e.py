"""Faults on the real daemon: disconnecting clients, SIGKILL mid-traffic, a damaged database,
an archive directory that cannot be written. Nothing is lost, nothing is duplicated, and the
daemon says clearly what is wrong instead of starting over a file it cannot read.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from conftest import Daemon, running_daemon, spawn_daemon, wait_until

pytestmark = pytest.mark.e2e

MSG = [{"role": "user", "content": "Say hi."}]
LONG = [{"role": "user", "content": "Write a very long story about a dragon."}]


def has_responses_api(d: Daemon) -> bool:
    with d.http() as http:
        resp = http.get("/v1/responses/resp_probe")
    return not (resp.status_code == 404 and "no route" in resp.text)


@pytest.fixture(scope="module")
def single_slot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One generation at a time: a leaked slot would block every later request."""
    with running_daemon(tmp_path_factory.mktemp("slot"), "[engine]\nmax_batch_size = 1\n") as d:
        yield d


# -- disconnecting clients -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": LONG, "max_tokens": 2000, "stream": True}),
        ("/v1/responses", {"input": LONG[0]["content"], "max_output_tokens": 2000, "stream": True}),
    ],
)
def test_disconnected_stream_frees_its_slot(
    single_slot: Daemon, path: str, body: dict[str, Any]
) -> None:
    """A client that closes a stream after two chunks frees the only batch slot at once: the
    next request completes (a leaked slot would make it wait for 2000 tokens), and the
    request is logged as 499 client_disconnected."""
    if path == "/v1/responses" and not has_responses_api(single_slot):
        pytest.skip("the Responses API is not present")
    with single_slot.http(timeout=60) as http:
        with http.stream("POST", path, json={**body, "temperature": 0}) as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()
            frames = 0
            for line in lines:
                frames += line.startswith("data: ")
                if frames >= 2:
                    break
        # The connection is closed here, mid-generation.
        start = time.perf_counter()
        resp = http.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 3})
        elapsed = time.perf_counter() - start
        assert resp.status_code == 200, resp.text
        print(f"\nnext request after a disconnect ({path}) completed in {elapsed:.2f} s")
        wait_until(lambda: http.get("/health").json()["active"] == 0, 30, "the slot to free")
    events = [e for e in single_slot.log_events() if e.get("event") == "request.completed"]
    assert any(e["path"] == path and e["status"] == 499 for e in events)


def test_disconnected_response_stream_is_not_stored(single_slot: Daemon) -> None:
    """A Responses stream cut by its client stores nothing: its id never becomes retrievable."""
    if not has_responses_api(single_slot):
        pytest.skip("the Responses API is not present")
    body = {"input": LONG[0]["content"], "max_output_tokens": 2000, "stream": True}
    with single_slot.http(timeout=60) as http:
        rid = None
        with http.stream("POST", "/v1/responses", json=body) as stream:
            lines = stream.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    rid = json.loads(line[6:]).get("response", {}).get("id")
                    if rid:
                        break
        assert rid
        wait_until(lambda: http.get("/health").json()["active"] == 0, 30, "the slot to free")
        assert http.get(f"/v1/responses/{rid}").status_code == 404


# -- SIGKILL during traffic ------------------------------------------------------------------
def _archived_turns(archive_dir: Path) -> dict[str, list[str]]:
    """response id -> archive files holding it; every file must be whole JSON."""
    found: dict[str, list[str]] = {}
    if not archive_dir.exists():
        return found
    for path in archive_dir.glob("*.json"):
        doc = json.loads(path.read_text())  # a partial file would fail here
        assert path.name == f"{doc['conversation_id']}.json"
        for turn in doc["turns"]:
            found.setdefault(turn["response_id"], []).append(path.name)
    return found


def test_sigkill_during_traffic_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    """SIGKILL while clients create and chain responses and the sweeper archives them; after a
    restart every response a client got is either live (retrievable) or in exactly one whole
    archive file, and once all have expired each is archived exactly once."""
    config = "[conversations]\nttl_seconds = 1\nsweep_interval_seconds = 0.2\n"
    d = spawn_daemon(tmp_path, config)
    d.wait_ready()
    if not has_responses_api(d):
        pytest.skip("the Responses API is not present")
    created: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(n: int) -> None:
        previous: str | None = None
        with d.http(timeout=30) as http:
            while not stop.is_set():
                body: dict[str, Any] = {"input": f"Say {n}.", "max_output_tokens": 3}
                if previous is not None:
                    body["previous_response_id"] = previous
                try:
                    resp = http.post("/v1/responses", json=body)
                except httpx.HTTPError:
                    return  # the daemon was killed
                if resp.status_code == 200:
                    with lock:
                        created.append(resp.json()["id"])
                    previous = resp.json()["id"] if previous is None else None
                else:  # a parent archived meanwhile: start a new conversation
                    assert resp.json()["error"]["code"] == "previous_response_not_found"
                    previous = None

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(3)]
    for t in threads:
        t.start()
    archive_dir = d.state_dir / "conversation_logs"
    wait_until(lambda: len(created) >= 6 and archive_dir.exists(), 90, "traffic and archives")
    d.process.send_signal(signal.SIGKILL)
    d.process.wait(10)
    stop.set()
    for t in threads:
        t.join(30)
    with lock:
        ids = list(created)

    restarted = spawn_daemon(tmp_path, "", state_dir=d.state_dir)
    try:
        restarted.wait_ready()
        with restarted.http() as http:

            def settled() -> bool:
                archived = _archived_turns(archive_dir)
                return all(
                    rid in archived or http.get(f"/v1/responses/{rid}").status_code == 200
                    for rid in ids
                )

            wait_until(settled, 10, "every response to be live or archived")

            def all_archived() -> bool:
                archived = _archived_turns(archive_dir)
                return all(rid in archived for rid in ids)

            wait_until(all_archived, 30, "every conversation to be archived")
            archived = _archived_turns(archive_dir)
            for rid in ids:
                assert len(archived[rid]) == 1, (rid, archived[rid])
                assert http.get(f"/v1/responses/{rid}").status_code == 404
        print(f"\n{len(ids)} responses created before SIGKILL; all archived exactly once")
    finally:
        restarted.stop(timeout=20)


# -- damaged database ------------------------------------------------------------------------
def test_damaged_database_refuses_to_start_and_keeps_the_file(tmp_path: Path) -> None:
    """A database file that is not SQLite stops the daemon with a clear message and a hint;
    the file is left byte for byte as it was (never silently replaced by an empty store)."""
    state = tmp_path / "state"
    state.mkdir()
    db = state / "conversations.sqlite3"
    garbage = b"this is not an SQLite database\n" * 200
    db.write_bytes(garbage)
    d = spawn_daemon(tmp_path, "", state_dir=state)
    try:
        code = d.process.wait(60)
    finally:
        if d.process.poll() is None:
            d.process.kill()
    assert code > 0  # a clean refusal, not a crash (a negative code is a signal)
    err = d.stderr_tail(10**6)
    assert "damaged" in err and str(db) in err
    assert "Hint" in err
    assert db.read_bytes() == garbage


# -- archive directory that cannot be written ------------------------------------------------
def test_unwritable_archive_keeps_conversations_live_and_retries(tmp_path: Path) -> None:
    """When the archive directory cannot be created, expired conversations stay in the live
    store, the failure is logged, and the next sweep after the fix archives them."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the archive directory should be\n")
    archive_dir = blocker / "archive"
    config = (
        "[conversations]\nttl_seconds = 1\nsweep_interval_seconds = 0.2\n"
        f'archive_dir = "{archive_dir}"\n'
    )
    d = spawn_daemon(tmp_path, config)
    try:
        d.wait_ready()
        if not has_responses_api(d):
            pytest.skip("the Responses API is not present")
        with d.http() as http:
            rid = http.post("/v1/responses", json={"input": "hi", "max_output_tokens": 3}).json()[
                "id"
            ]

            def failed_logged() -> bool:
                return any(e.get("event") == "conversations.archive_failed" for e in d.log_events())

            wait_until(failed_logged, 30, "conversations.archive_failed")
            assert http.get(f"/v1/responses/{rid}").status_code == 200  # still live
            blocker.unlink()
            wait_until(lambda: (archive_dir / "").exists(), 30, "the archive directory")
            wait_until(
                lambda: http.get(f"/v1/responses/{rid}").status_code == 404, 30, "the archive"
            )
        assert rid in _archived_turns(archive_dir)
    finally:
        d.stop(timeout=20)
