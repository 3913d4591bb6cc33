"""Open the store when the daemon starts; run the sweeper until shutdown.

The service opens the store *before* it starts the engine thread, so a damaged database ends
the process cleanly (exit status 1, message naming the file and the fix) with nothing else
running.

The sweeper reads ``state.settings.conversations`` afresh on every round, so a config reload
changes ``ttl_seconds`` and ``sweep_interval_seconds`` live. (``database`` and
``archive_dir`` are read at each round too for the archive; the database file itself is
opened once and a new path applies at the next start.)
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from ..logs import get_logger
from . import archive
from .store import Store, StoreDamaged

log = get_logger("mlxd.conversations")


async def open_store(state: Any) -> Store:
    """Open the database at ``[conversations] database``; raises StoreDamaged (never replaces
    a damaged file with an empty store)."""
    path = state.settings.database_path()
    try:
        store = await asyncio.to_thread(Store.open, path)
    except StoreDamaged as exc:
        log.error("store.damaged", path=str(path), error=str(exc))
        raise
    counts = await asyncio.to_thread(store.counts)
    log.info("store.opened", path=str(path), **counts)
    return store


async def sweep_forever(state: Any, shutdown: asyncio.Event) -> None:
    """Archive expired conversations every ``sweep_interval_seconds`` until shutdown."""
    while not shutdown.is_set():
        conv = state.settings.conversations
        try:
            await asyncio.to_thread(
                archive.sweep, state.store, state.settings.archive_path(), conv.ttl_seconds
            )
        except Exception as exc:  # a bug or a broken disk must not end the sweeper
            log.exception("conversations.sweep_failed", error=f"{type(exc).__name__}: {exc}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(shutdown.wait(), conv.sweep_interval_seconds)
