"""Open the store when the daemon starts; run the sweeper until shutdown.

The sweeper reads ``state.settings.conversations`` afresh on every round, so a config reload
changes ``ttl_seconds`` and ``sweep_interval_seconds`` live. (``database`` and
``archive_dir`` are read at each round too for the archive; the database file itself is
opened once and a new path applies at the next start.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from typing import Any

from ..logs import get_logger
from . import archive
from .store import Store, StoreDamaged

log = get_logger("mlxd.conversations")


async def start(service: Any) -> list[asyncio.Task[None]]:
    """Open the database into ``service.state.store`` and start the sweeper task.

    A damaged database ends the process at once with status 1 and a message naming the file
    and the fix; the file is left untouched (never silently replaced by an empty store).
    """
    state = service.state
    path = state.settings.database_path()
    try:
        store = await asyncio.to_thread(Store.open, path)
    except StoreDamaged as exc:
        log.error("store.damaged", path=str(path), error=str(exc))
        print(f"mlxd: {exc}", file=sys.stderr, flush=True)
        logging.shutdown()
        # os._exit, not an exception: the engine thread is already loading the model, and MLX
        # aborts (SIGABRT) if the interpreter is torn down under it.
        os._exit(1)
    state.store = store
    counts = await asyncio.to_thread(store.counts)
    log.info("store.opened", path=str(path), **counts)
    return [asyncio.ensure_future(sweep_forever(state, service.shutdown))]


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
