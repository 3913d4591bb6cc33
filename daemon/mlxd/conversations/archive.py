"""Expired conversations to JSON files: write atomically, then delete from the live store.

Order matters for crash safety. The file is written to a temporary name in the archive
directory, fsynced, renamed over ``<conversation id>.json`` and the directory is fsynced;
only then are the rows deleted (and tombstoned) in one transaction. A crash before the
rename leaves the rows (the next sweep tries again and removes the stale temporary file); a
crash after it but before the delete leaves both, and the next sweep rewrites the same file
name with the same content. So a conversation is never lost and never archived twice.
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..logs import get_logger
from .store import ConversationDump, Store

log = get_logger("mlxd.conversations")

ARCHIVE_FORMAT = 1
_TMP_SUFFIX = ".tmp"


def archive_name(conversation_id: str) -> str:
    """The file of a conversation: stable, so rewriting it is idempotent."""
    return f"{conversation_id}.json"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def archive_document(dump: ConversationDump, archived_at: float) -> dict[str, Any]:
    """The JSON written for one conversation: ids, model, timestamps, every turn in order."""
    turns = []
    for t in dump.turns:
        body = t.body
        turns.append(
            {
                "response_id": t.id,
                "previous_response_id": t.previous_response_id,
                "created_at": _iso(t.created_at),
                "status": body.get("status"),
                "model": body.get("model"),
                "instructions": body.get("instructions"),
                "input": t.input_items,
                "output_text": output_text(body),
                "output": body.get("output", []),
                "usage": body.get("usage"),
                "metadata": body.get("metadata") or {},
                "deleted": t.deleted,
            }
        )
    return {
        "format": ARCHIVE_FORMAT,
        "conversation_id": dump.id,
        "model": dump.model,
        "created_at": _iso(dump.created_at),
        "last_activity_at": _iso(dump.last_activity),
        "archived_at": _iso(archived_at),
        "turns": turns,
    }


def output_text(body: dict[str, Any]) -> str:
    """The concatenated output_text parts of a Response object's message items."""
    texts = []
    for item in body.get("output") or []:
        if item.get("type") == "message":
            for part in item.get("content") or []:
                if part.get("type") == "output_text":
                    texts.append(part.get("text", ""))
    return "".join(texts)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{_TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not possible on every platform/filesystem; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _encode(doc: dict[str, Any], conv_id: str) -> bytes | None:
    """The file's bytes; None (reported) for a record that cannot be written at all.

    Text that is not valid Unicode (a lone surrogate stored before the API refused them)
    cannot be UTF-8: such a document is written with ASCII escapes instead (``\\ud800``),
    which is still valid JSON and loses nothing. One bad record must never stop the sweeper.
    """
    try:
        return (json.dumps(doc, ensure_ascii=False, indent=2) + "\n").encode()
    except UnicodeEncodeError:
        reason = "text that is not valid Unicode; written with \\u escapes"
        log.warning("conversations.archive_escaped", conversation_id=conv_id, reason=reason)
    try:
        return (json.dumps(doc, ensure_ascii=True, indent=2) + "\n").encode()
    except (TypeError, ValueError) as exc:
        log.error(
            "conversations.archive_skipped",
            conversation_id=conv_id,
            error=f"{type(exc).__name__}: {exc}",
        )
        return None


def remove_stale_temps(archive_dir: Path) -> None:
    """Temporary files left by a crash mid-write (only the sweeper writes here)."""
    try:
        for stale in archive_dir.glob(f".*.json.*{_TMP_SUFFIX}"):
            stale.unlink(missing_ok=True)
    except OSError:
        pass


def sweep(
    store: Store, archive_dir: Path, ttl_seconds: float, now: float | None = None
) -> list[Path]:
    """Archive every conversation idle for ``ttl_seconds``; returns the files written.

    Runs synchronously (call it through ``asyncio.to_thread``). A failure to write leaves the
    conversation in the live store and logs ``conversations.archive_failed``; the next sweep
    retries.
    """
    now = time.time() if now is None else now
    written: list[Path] = []
    expired = store.expired(now - ttl_seconds, now)
    if not expired:
        return written
    remove_stale_temps(archive_dir)
    for conv_id in expired:
        dump = store.dump(conv_id)
        if dump is None:
            continue
        path = archive_dir / archive_name(conv_id)
        data = _encode(archive_document(dump, now), conv_id)
        if data is None:
            continue  # reported; the other conversations are still archived
        try:
            write_atomic(path, data)
        except OSError as exc:
            log.error(
                "conversations.archive_failed",
                conversation_id=conv_id,
                path=str(path),
                error=f"{type(exc).__name__}: {exc}",
            )
            break  # the directory is the problem: the other conversations would fail too
        if store.remove_archived(dump, path, now):
            written.append(path)
            log.info(
                "conversations.archived",
                conversation_id=conv_id,
                turns=len(dump.turns),
                path=str(path),
            )
    return written
