"""Process lifecycle: start the engine and hypercorn, own the signals, shut down in order.

Why signals are installed here: hypercorn installs none when it is given a
``shutdown_trigger``, and the daemon must decide what SIGTERM means. SIGTERM/SIGINT set one
shutdown event: ``/health`` turns 503, the listener closes, in-flight requests get
``server.shutdown_timeout_seconds`` to finish, whatever is still running then ends with a
clear ``shutting down`` error (streams get an error frame, not a cut connection), the store
is closed and the process exits 0. A second SIGTERM/SIGINT exits at once. SIGHUP reloads
the config. Service files give the process that budget plus 10 s before they kill it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from . import fdlimit
from .api.app import create_app
from .api.context import AppState
from .config import Settings
from .conversations import lifecycle
from .conversations.store import StoreDamaged
from .engine.core import Engine, Residency
from .engine.distributed import Group
from .engine.loader import LoadedModel
from .errors import MlxdError, ModelUnavailable
from .logs import get_logger, set_level, setup_logging
from .reload import LOG_FILE_KEYS, Reloader, touches_models
from .sdnotify import sd_notify

log = get_logger("mlxd.service")


#: hypercorn limits, chosen rather than inherited (README "Limits" lists them). A connection
#: that is idle, or has sent only part of its request head, is closed after
#: KEEP_ALIVE_TIMEOUT; a body that stops arriving gets 408 (mlxd.api.body); the head may be
#: at most MAX_HEAD_BYTES (and mlxd.api.body allows MAX_HEADERS lines).
KEEP_ALIVE_TIMEOUT = 20
MAX_HEAD_BYTES = 16 * 1024
LISTEN_BACKLOG = 1024


class Service:
    """One daemon process: settings, engine, app, background tasks.

    ``run`` is three steps: :meth:`start` (store, engine, sweeper, reloader, signals),
    :meth:`serve` (hypercorn until the shutdown event) and :meth:`stop` (in order).
    """

    def __init__(
        self, settings: Settings, config_path: Path | None, group: Group | None = None
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self.engine = Engine(
            Residency.from_settings(settings), settings.engine, settings.state_dir(), group
        )
        self.state = AppState(settings=settings, engine=self.engine, config_path=config_path)
        self.state.api_keys = settings.api_keys()
        self.shutdown = asyncio.Event()
        self.restart_requested = False
        self.reloader = Reloader(
            config_path,
            settings,
            self.state.api_keys,
            self.shutdown,
            apply=self.apply_config,
            restart=self.request_restart,
            record=self._record_reload,
            models_restart=group is not None,
        )
        self._signals = 0
        self._tasks: list[asyncio.Task[Any]] = []

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("server.forced_exit", signal=signal.Signals(signum).name)
            os._exit(1)
        log.info("server.stopping", signal=signal.Signals(signum).name)
        sd_notify("STOPPING=1")
        self.state.shutting_down = True
        self.shutdown.set()

    async def run(self) -> int:
        """Start, serve until shutdown, stop; the process exit status."""
        code = await self.start()
        if code is not None:
            return code
        try:
            return await self.serve()
        finally:
            await self.stop()

    async def start(self) -> int | None:
        """Open the store, start the engine and the background tasks, install the signals.
        Returns an exit status if the daemon cannot start (nothing else is running then)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        soft, hard = fdlimit.raise_soft_limit()
        if soft < fdlimit.LOW_LIMIT:
            log.warning("server.fd_limit_low", soft=soft, hard=hard, hint="raise ulimit -n")

        def loaded(lm: LoadedModel) -> None:
            loop.call_soon_threadsafe(self._on_model_loaded, lm.id)

        def ready(status: str) -> None:
            loop.call_soon_threadsafe(sd_notify, f"READY=1\nSTATUS={status}")

        self.engine.on_loaded.append(loaded)
        self.engine.on_ready.append(ready)
        try:
            self.state.store = await lifecycle.open_store(self.state)
        except StoreDamaged as exc:
            print(f"mlxd: {exc}", file=sys.stderr, flush=True)
            return 1
        self.engine.start()
        self._tasks.append(
            asyncio.ensure_future(lifecycle.sweep_forever(self.state, self.shutdown))
        )
        loop.add_signal_handler(signal.SIGHUP, self.reloader.request)
        self._tasks.append(asyncio.ensure_future(self.reloader.watch()))
        return None

    async def serve(self) -> int:
        """Serve HTTP until the shutdown event; 1 if the address cannot be bound."""
        from hypercorn.asyncio import serve
        from hypercorn.config import Config

        server = self.settings.server
        config = Config()
        host = f"[{server.host}]" if ":" in server.host else server.host
        config.bind = [f"{host}:{server.port}"]
        config.graceful_timeout = server.shutdown_timeout_seconds + 2
        config.accesslog = None
        config.errorlog = logging.getLogger("hypercorn.error")  # through our pipeline
        config.keep_alive_timeout = KEEP_ALIVE_TIMEOUT
        config.h11_max_incomplete_size = MAX_HEAD_BYTES
        config.h2_max_header_list_size = MAX_HEAD_BYTES
        config.backlog = LISTEN_BACKLOG
        log.info(
            "server.starting",
            host=server.host,
            port=server.port,
            pid=os.getpid(),
            config=str(self.config_path) if self.config_path else None,
            log_file=str(self.settings.log_path()),
        )
        watchdog = asyncio.ensure_future(self._cancel_stragglers())
        try:
            await serve(create_app(self.state), config, shutdown_trigger=self.shutdown.wait)
        except OSError as exc:
            log.error("server.bind_failed", host=server.host, port=server.port, error=str(exc))
            return 1
        finally:
            watchdog.cancel()
        return 0

    async def stop(self) -> None:
        """Background tasks, then the engine, then the store."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.engine.stop()
        if self.state.store is not None:
            self.state.store.close()
        log.info("server.stopped")

    # -- what the reloader may do -------------------------------------------------------------
    async def apply_config(
        self, new: Settings, changed: list[str], api_keys: list[str]
    ) -> str | None:
        """Put a validated configuration into effect, all or nothing; None, or why not."""
        if touches_models(changed):
            error = await self._apply_models(self.settings, new)
            if error is not None:
                return error
        if any(k.startswith("logging.") for k in changed):
            if LOG_FILE_KEYS.intersection(changed):
                try:  # new handlers are built before the old ones are dropped
                    setup_logging(new.logging, new.log_path())
                except OSError as exc:
                    return f"logging.file: cannot open {new.log_path()}: {exc}"
            else:
                set_level(new.logging.level)
        if any(k.startswith("engine.") for k in changed):
            self.engine.retune(new.engine)
        self.state.api_keys = api_keys
        self.settings = new
        self.state.settings = new
        return None

    def request_restart(self, keys: list[str]) -> None:
        """Orderly shutdown, then cli re-executes the process (see ``cli._serve``)."""
        log.info("server.stopping", reason="restart", changed=keys)
        self.restart_requested = True
        self.state.shutting_down = True
        self.shutdown.set()

    def _record_reload(self, outcome: dict[str, Any]) -> None:
        self.state.last_reload = outcome

    async def _apply_models(self, old: Settings, new: Settings) -> str | None:
        """Hand the new model table to the engine; None on success, else why the edit is
        rejected.

        Added and changed entries with ``preload`` are loaded before the edit counts as
        applied. Removed and changed models finish their requests first, then unload; the
        other models are untouched. A single-model config (``[model]``) keeps its old model
        serving until the new one is loaded; if the new one fails, the old table is restored
        and the edit rejected (with several models the failed entry stays configured as
        ``failed`` and its next request tries again).
        """
        from dataclasses import replace

        from .engine.residency import needs_reload
        from .models.memory import pinned_problem
        from .models.registry import is_legacy, model_table

        device = self.engine.device
        problem = await asyncio.to_thread(
            pinned_problem, new, device.get("device", "cpu"), device.get("backend", "cpu")
        )
        if problem is not None:
            return problem
        before, after = model_table(old), model_table(new)
        target = Residency.from_settings(new)
        to_load = [
            i
            for i, e in after.items()
            if e.preload and (i not in before or needs_reload(before[i], e))
        ]
        legacy = is_legacy(new) and is_legacy(old)
        if legacy and to_load:
            # The old model keeps answering (settings are not swapped yet) while the new loads.
            # It stays the default too, so /health reports it (or its failure) until the swap.
            kept = {i: e for i, e in before.items() if i not in after}
            default = Residency.from_settings(old).default_id
            self.engine.configure(
                replace(target, entries={**target.entries, **kept}, default_id=default)
            )
        else:
            self.engine.configure(target)
        for entry_id in to_load:
            log.info("model.switching", id=entry_id, path=after[entry_id].path)
            try:
                await asyncio.wrap_future(self.engine.acquire(entry_id))
            except MlxdError as exc:
                if legacy:
                    self.engine.configure(Residency.from_settings(old))
                    return f"model {after[entry_id].path!r} failed to load: {exc.message}"
                log.warning("model.preload_failed", id=entry_id, error=exc.message)
        if legacy and to_load:
            self.engine.configure(target)
        return None

    def _on_model_loaded(self, model_id: str) -> None:
        sd_notify(f"READY=1\nSTATUS=serving {model_id}")

    async def _cancel_stragglers(self) -> None:
        """After the shutdown budget, end what still runs with a clear error."""
        await self.shutdown.wait()
        await asyncio.sleep(self.settings.server.shutdown_timeout_seconds)
        n = self.engine.abort_all(ModelUnavailable("mlxd is shutting down", retry_after=5))
        if n:
            log.warning("server.cancelling_requests", count=n)
