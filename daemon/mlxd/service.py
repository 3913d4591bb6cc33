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
import socket
import sys
from pathlib import Path
from typing import Any

from . import reload
from .api.app import create_app
from .api.context import AppState
from .config import Settings
from .conversations import lifecycle
from .conversations.store import StoreDamaged
from .engine.core import Engine
from .engine.loader import LoadedModel
from .errors import ModelUnavailable
from .logs import get_logger

log = get_logger("mlxd.service")


def sd_notify(message: str) -> None:
    """Tell systemd about our state (Type=notify); a no-op when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("systemd.notify_failed", error=str(exc))


class Service:
    """One daemon process: settings, engine, app, background tasks."""

    def __init__(self, settings: Settings, config_path: Path | None) -> None:
        self.settings = settings
        self.config_path = config_path
        self.engine = Engine(settings.model, settings.engine)
        self.state = AppState(settings=settings, engine=self.engine, config_path=config_path)
        self.state.api_keys = settings.api_keys()
        self.shutdown = asyncio.Event()
        self.restart_requested = False
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
        from hypercorn.asyncio import serve
        from hypercorn.config import Config

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

        def loaded(lm: LoadedModel) -> None:
            loop.call_soon_threadsafe(self._on_model_loaded, lm.id)

        self.engine.on_loaded.append(loaded)
        try:
            self.state.store = await lifecycle.open_store(self.state)
        except StoreDamaged as exc:
            print(f"mlxd: {exc}", file=sys.stderr, flush=True)
            return 1
        self.engine.start()
        self._tasks.append(
            asyncio.ensure_future(lifecycle.sweep_forever(self.state, self.shutdown))
        )
        loop.add_signal_handler(signal.SIGHUP, lambda: reload.request(self))
        self._tasks.append(asyncio.ensure_future(reload.watch(self)))
        app = create_app(self.state)
        server = self.settings.server
        config = Config()
        host = f"[{server.host}]" if ":" in server.host else server.host
        config.bind = [f"{host}:{server.port}"]
        config.graceful_timeout = server.shutdown_timeout_seconds + 2
        config.accesslog = None
        config.errorlog = logging.getLogger("hypercorn.error")  # through our pipeline
        config.keep_alive_timeout = 75
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
            await serve(app, config, shutdown_trigger=self.shutdown.wait)
        except OSError as exc:
            log.error("server.bind_failed", host=server.host, port=server.port, error=str(exc))
            return 1
        finally:
            watchdog.cancel()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self.engine.stop()
            if self.state.store is not None:
                self.state.store.close()
            log.info("server.stopped")
        return 0

    def _on_model_loaded(self, model_id: str) -> None:
        sd_notify(f"READY=1\nSTATUS=serving {model_id}")

    async def _cancel_stragglers(self) -> None:
        """After the shutdown budget, end what still runs with a clear error."""
        await self.shutdown.wait()
        await asyncio.sleep(self.settings.server.shutdown_timeout_seconds)
        n = self.engine.active_count() + self.engine.queue_depth()
        if n:
            log.warning("server.cancelling_requests", count=n)
        self.engine.abort_all(ModelUnavailable("mlxd is shutting down", retry_after=5))
