"""Config hot reload: watch the file, rebuild and validate, diff, apply what changed.

Triggers: a change of the config file (its *directory* is watched, because editors save by
writing a temporary file and renaming it over the original) and SIGHUP (also re-reads
``security.api_key_file``). Every trigger runs the same steps, one reload at a time:

1. Rebuild: ``load_settings`` (and the API key file) off the event loop. A file that does not
   parse or validate is rejected: ``config.reload_rejected`` is logged with the reason and the
   last good configuration keeps running.
2. Diff the old and new settings key by key (``model.path``, ``logging.level``, ...).
3. Apply, all or nothing:

   * ``server.host``/``server.port`` (and the paths that files are opened at, see
     ``RESTART_KEYS``): an orderly shutdown, then the process re-executes itself (same PID,
     so launchd/systemd see no exit; conversations live in SQLite and survive).
   * the model table (``[model]``, ``[models.<id>]``, ``[routing]``, the memory budget): the
     engine applies it per entry: added models with ``preload`` load, a removed or changed
     model finishes its requests and then unloads (a changed one loads anew), the others are
     untouched. With a single ``[model]``, a model that fails to load rejects the whole edit
     and the old one keeps serving.
   * everything else swaps the frozen settings tree that routes read per request (generation
     defaults, CORS, allowed hosts, API keys, conversation TTL/sweep interval, limits);
     ``[engine]`` goes to ``Engine.retune`` (prefill step and warm-up apply from the next
     model load; ``max_batch_size`` and the budget reach the engine with the model table,
     which resizes a loaded model's batch once it is idle); ``[logging]`` re-levels or
     re-opens the log.

Everything a restart needs is checked *before* the daemon stops: the new address can be
bound, the state directory, database and archive directories can be written, the log file
can be opened. A reload that fails any check is rejected and the running daemon carries on
(a re-executed process that cannot start would exit, and 78 is final for service managers).

Outcome: ``config.reloaded`` with the changed key paths, and ``last_reload`` (shown by
``/health``) = ``{"at", "ok", "changed", "error"}``.

Ownership: the service owns one :class:`Reloader` and hands it two narrow callables,
``apply`` (put a validated new configuration into effect; the service knows the engine and
the app state) and ``restart`` (stop in order and re-execute). This module imports nothing
of the service, and keeps no module-level state.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import tempfile
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .config import ConfigError, Settings, load_settings
from .logs import get_logger

log = get_logger("mlxd.reload")

#: Keys that cannot change in a running process: the listener, the files the store and the
#: BLAS were opened with. Changing one restarts the process in place (same PID).
RESTART_KEYS = frozenset(
    {
        "server.host",
        "server.port",
        "server.state_dir",
        "conversations.database",
        "conversations.archive_dir",
        "engine.blas",
        # A group is launched with these (mlxd serve heads a group when hosts are set).
        "distributed.hosts",
        "distributed.hostfile",
        "distributed.backend",
        "distributed.sharding",
        "distributed.starting_port",
        "distributed.step_timeout",
    }
)
#: Keys that change the model table the engine holds (``Service.apply_config`` hands the
#: new table to the engine, which applies it per entry): any ``model.*``, ``models.*`` or
#: ``routing.*`` key, and these.
MODEL_KEYS = frozenset({"engine.memory_budget_bytes", "engine.max_batch_size"})
MODEL_PREFIXES = ("model.", "models.", "routing.")


def touches_models(changed: list[str]) -> bool:
    return bool(MODEL_KEYS.intersection(changed)) or any(
        k.startswith(MODEL_PREFIXES) for k in changed
    )


#: Log file keys: the handlers are rebuilt.
LOG_FILE_KEYS = frozenset(
    {"logging.file", "logging.max_bytes", "logging.backup_count", "logging.format"}
)

#: Quiet time (ms) after the last file event before reloading, so an editor's
#: truncate-then-write never gets read half-written.
WATCH_STEP_MS = 250
#: Longest time (ms) events are grouped while the file keeps changing.
WATCH_DEBOUNCE_MS = 1600

#: ``apply(new, changed, api_keys)``: put ``new`` into effect; None, or why it could not be.
Apply = Callable[[Settings, list[str], list[str]], Awaitable[str | None]]
#: ``restart(keys)``: an orderly shutdown, then the process re-executes itself.
Restart = Callable[[list[str]], None]


def diff(old: Settings, new: Settings) -> list[str]:
    """Dotted key paths whose values differ, sorted (``["logging.level", "model.path"]``)."""
    a, b = old.model_dump(), new.model_dump()
    return sorted(
        f"{section}.{key}"
        for section in a.keys() | b.keys()
        for key in a.get(section, {}).keys() | b.get(section, {}).keys()
        if a.get(section, {}).get(key) != b.get(section, {}).get(key)
    )


def rebuild(path: Path | None) -> tuple[Settings, list[str]]:
    """Read and validate the file and the API key file (blocking; runs in a worker thread)."""
    settings = load_settings(path)
    return settings, settings.api_keys()


class Reloader:
    """One reload at a time: rebuild, diff, check, then ``apply`` or ``restart``."""

    def __init__(
        self,
        config_path: Path | None,
        settings: Settings,
        api_keys: list[str],
        shutdown: asyncio.Event,
        *,
        apply: Apply,
        restart: Restart,
        record: Callable[[dict[str, Any]], None] | None = None,
        models_restart: bool = False,
    ) -> None:
        #: A process group (one model, loaded by every rank) applies a new model table by
        #: starting again: rank 0 stops the followers and exits, the supervisor relaunches.
        self.models_restart = models_restart
        self.config_path = config_path
        self.settings = settings  # the configuration in effect
        self.api_keys = api_keys
        self.shutdown = shutdown
        self.last_reload: dict[str, Any] | None = None
        self._apply = apply
        self._restart = restart
        self._on_record = record
        self._lock = asyncio.Lock()
        self._pending: set[asyncio.Task[Any]] = set()

    def request(self, trigger: str = "signal") -> None:
        """Schedule a reload now (the SIGHUP handler: it must not block, so it makes a task)."""
        log.info("config.reload_requested", trigger=trigger)
        task = asyncio.get_running_loop().create_task(self.reload_now(trigger=trigger))
        self._pending.add(task)  # the loop only keeps weak references to tasks
        task.add_done_callback(self._pending.discard)

    async def watch(self) -> None:
        """Reload whenever the config file changes, until the shutdown event is set."""
        from watchfiles import Change, awatch

        path = self.config_path
        if path is None:
            log.info(
                "config.watch_disabled", reason="no config file; defaults and environment only"
            )
            return
        path = path.absolute()
        name = path.name

        def only_config(_change: Change, changed: str) -> bool:
            return Path(changed).name == name

        # watchfiles logs "N changes detected" at info; config.reloaded/unchanged says more.
        logging.getLogger("watchfiles").setLevel(logging.WARNING)
        log.debug("config.watching", path=str(path))
        try:
            async for _changes in awatch(
                path.parent,
                watch_filter=only_config,
                debounce=WATCH_DEBOUNCE_MS,
                step=WATCH_STEP_MS,
                stop_event=self.shutdown,
                recursive=False,
            ):
                if self.shutdown.is_set():
                    break
                await self.reload_now(trigger="file")
        except (OSError, RuntimeError) as exc:  # e.g. the directory vanished
            log.error("config.watch_failed", path=str(path), error=str(exc))

    async def reload_now(self, *, trigger: str = "signal") -> bool:
        """Run one reload; True when a new configuration is in effect (or nothing changed)."""
        async with self._lock:
            try:
                return await self._reload(trigger)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug here must not take the watcher (or daemon) down
                log.exception("config.reload_failed", trigger=trigger, error=str(exc))
                self._record(False, [], f"{type(exc).__name__}: {exc}")
                return False

    async def _reload(self, trigger: str) -> bool:
        if self.shutdown.is_set():
            return False
        old = self.settings
        try:
            new, api_keys = await asyncio.to_thread(rebuild, self.config_path)
        except ConfigError as exc:
            return self._reject(trigger, str(exc))
        changed = diff(old, new)
        if api_keys != self.api_keys and "security.api_keys" not in changed:
            changed.append("security.api_key_file")  # the key file's contents changed
        if not changed:
            # A save without edits, or SIGHUP with nothing new: say so, keep last_reload.
            level = "info" if trigger == "signal" else "debug"
            getattr(log, level)("config.unchanged", trigger=trigger)
            return True
        problem = await asyncio.to_thread(preflight, new, changed)
        if problem is not None:
            return self._reject(trigger, problem, changed)
        restart = sorted(RESTART_KEYS.intersection(changed))
        if self.models_restart and touches_models(changed):
            restart = sorted(set(restart) | {k for k in changed if touches_models([k])})
        if restart:
            log.info("config.reloaded", trigger=trigger, changed=changed, restart=True)
            self._record(True, changed, None)
            self._restart(restart)
            return True
        error = await self._apply(new, changed, api_keys)
        if error is not None:
            return self._reject(trigger, error, changed)
        self.settings, self.api_keys = new, api_keys
        log.info("config.reloaded", trigger=trigger, changed=changed)
        self._record(True, changed, None)
        return True

    def _record(self, ok: bool, changed: list[str], error: str | None) -> None:
        self.last_reload = {
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "ok": ok,
            "changed": changed,
            "error": error,
        }
        if self._on_record is not None:
            self._on_record(self.last_reload)

    def _reject(self, trigger: str, error: str, changed: list[str] | None = None) -> bool:
        log.error("config.reload_rejected", trigger=trigger, error=error, changed=changed or [])
        self._record(False, changed or [], error)
        return False


# -- checks before anything changes ------------------------------------------------------------
def preflight(new: Settings, changed: list[str]) -> str | None:
    """Why ``new`` cannot be put into effect (blocking checks), or None."""
    keys = set(changed)
    if keys & {"server.host", "server.port"}:
        same_port = "server.port" not in keys
        problem = bind_problem(new.server.host, new.server.port, same_port=same_port)
        if problem is not None:
            return problem
    if keys & {"server.state_dir", "conversations.database", "conversations.archive_dir"}:
        for key, directory in (
            ("server.state_dir", new.state_dir()),
            ("conversations.database", new.database_path().parent),
            ("conversations.archive_dir", new.archive_path()),
        ):
            problem = _dir_problem(key, directory)
            if problem is not None:
                return problem
    if "server.state_dir" in keys or LOG_FILE_KEYS & keys:
        problem = _log_problem(new.log_path())
        if problem is not None:
            return problem
    return None


def bind_problem(host: str, port: int, *, same_port: bool = False) -> str | None:
    """Why the new listener address cannot be bound, or None (checked before restarting).

    With the port unchanged our own listener holds it, so only the address is checked
    (bound on an ephemeral port): a host that is not an address of this machine fails.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, 0 if same_port else port))
    except (OSError, UnicodeError) as exc:
        key = "server.host" if same_port else "server.port"
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        return f"{key}: cannot listen on {host}:{port}: {detail}"
    return None


def _dir_problem(key: str, directory: Path) -> str | None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".mlxd-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"{key}: {directory} is not a writable directory: {exc.strerror or exc}"
    return None


def _log_problem(path: Path) -> str | None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        return f"logging.file: cannot open {path}: {exc.strerror or exc}"
    return None
