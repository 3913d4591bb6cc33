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
   * ``[model] path/id/dtype/context_length``: the new model is loaded on the engine thread;
     requests in flight get ``SWITCH_GRACE_SECONDS`` to finish, then end with a 503 the OpenAI
     SDK retries. If the model fails to load, the old one keeps serving and the whole edit is
     rejected.
   * everything else swaps the frozen settings tree that routes read per request (generation
     defaults, CORS, allowed hosts, API keys, conversation TTL/sweep interval, limits);
     ``[engine]`` goes to ``Engine.retune`` (batch size and prefill step apply from the next
     model load); ``[logging]`` re-levels or re-opens the log.

Outcome: ``config.reloaded`` with the changed key paths, and ``state.last_reload`` (shown by
``/health``) = ``{"at", "ok", "changed", "error"}``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import weakref
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ConfigError, Settings, load_settings
from .logs import get_logger, set_level, setup_logging

if TYPE_CHECKING:
    from .service import Service

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
    }
)
#: Keys that need the model to be loaded again.
MODEL_KEYS = frozenset({"model.path", "model.id", "model.dtype", "model.context_length"})
#: Log file keys: the handlers are rebuilt.
LOG_FILE_KEYS = frozenset(
    {"logging.file", "logging.max_bytes", "logging.backup_count", "logging.format"}
)

#: Quiet time (ms) after the last file event before reloading, so an editor's
#: truncate-then-write never gets read half-written.
WATCH_STEP_MS = 250
#: Longest time (ms) events are grouped while the file keeps changing.
WATCH_DEBOUNCE_MS = 1600

_locks: weakref.WeakKeyDictionary[Service, asyncio.Lock] = weakref.WeakKeyDictionary()
_pending: set[asyncio.Task[Any]] = set()


def request(service: Service, trigger: str = "signal") -> None:
    """Schedule a reload now (SIGHUP handler; must not block, so it only creates a task)."""
    log.info("config.reload_requested", trigger=trigger)
    task = asyncio.get_running_loop().create_task(reload_now(service, trigger=trigger))
    _pending.add(task)  # keep a reference until done (the loop only holds weak ones)
    task.add_done_callback(_pending.discard)


async def watch(service: Service) -> None:
    """Reload whenever the config file changes, until the shutdown event is set."""
    from watchfiles import Change, awatch

    path = service.config_path
    if path is None:
        log.info("config.watch_disabled", reason="no config file; defaults and environment only")
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
            stop_event=service.shutdown,
            recursive=False,
        ):
            if service.shutdown.is_set():
                break
            await reload_now(service, trigger="file")
    except (OSError, RuntimeError) as exc:  # e.g. the directory vanished
        log.error("config.watch_failed", path=str(path), error=str(exc))


def diff(old: Settings, new: Settings) -> list[str]:
    """Dotted key paths whose values differ, sorted (``["logging.level", "model.path"]``)."""
    a, b = old.model_dump(), new.model_dump()
    return sorted(
        f"{section}.{key}"
        for section in a.keys() | b.keys()
        for key in a.get(section, {}).keys() | b.get(section, {}).keys()
        if a.get(section, {}).get(key) != b.get(section, {}).get(key)
    )


def _lock(service: Service) -> asyncio.Lock:
    lock = _locks.get(service)
    if lock is None:
        lock = _locks[service] = asyncio.Lock()
    return lock


def _rebuild(path: Path | None) -> tuple[Settings, list[str]]:
    """Read and validate the file and the API key file (blocking; runs in a worker thread)."""
    settings = load_settings(path)
    return settings, settings.api_keys()


def _record(service: Service, ok: bool, changed: list[str], error: str | None) -> None:
    service.state.last_reload = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "ok": ok,
        "changed": changed,
        "error": error,
    }


def _reject(service: Service, trigger: str, error: str, changed: list[str] | None = None) -> None:
    log.error("config.reload_rejected", trigger=trigger, error=error, changed=changed or [])
    _record(service, False, changed or [], error)


def _bind_problem(host: str, port: int) -> str | None:
    """Why the new listener address cannot be bound, or None (checked before restarting)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        return f"server.port: cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


async def reload_now(service: Service, *, trigger: str = "signal") -> bool:
    """Run one reload; returns True when a new configuration is in effect (or nothing changed)."""
    async with _lock(service):
        try:
            return await _reload(service, trigger)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not take the watcher (or the daemon) down
            log.exception("config.reload_failed", trigger=trigger, error=str(exc))
            _record(service, False, [], f"{type(exc).__name__}: {exc}")
            return False


async def _reload(service: Service, trigger: str) -> bool:
    if service.shutdown.is_set():
        return False
    old = service.settings
    try:
        new, api_keys = await asyncio.to_thread(_rebuild, service.config_path)
    except ConfigError as exc:
        _reject(service, trigger, str(exc))
        return False
    changed = diff(old, new)
    if api_keys != service.state.api_keys and "security.api_keys" not in changed:
        changed.append("security.api_key_file")  # the key file's contents changed
    if not changed:
        # A save without edits, or SIGHUP with nothing new: say so, keep last_reload as is.
        level = "info" if trigger == "signal" else "debug"
        getattr(log, level)("config.unchanged", trigger=trigger)
        return True

    restart = sorted(RESTART_KEYS.intersection(changed))
    if restart:
        if "server.port" in restart:  # same port on a new host: our own listener holds it
            problem = await asyncio.to_thread(_bind_problem, new.server.host, new.server.port)
            if problem is not None:
                _reject(service, trigger, problem, changed)
                return False
        log.info("config.reloaded", trigger=trigger, changed=changed, restart=True)
        _record(service, True, changed, None)
        _restart(service, restart)
        return True

    if MODEL_KEYS.intersection(changed):
        error = await _switch_model(service, new)
        if error is not None:
            _reject(service, trigger, error, changed)
            return False

    _apply_live(service, old, new, changed, api_keys)
    log.info("config.reloaded", trigger=trigger, changed=changed)
    _record(service, True, changed, None)
    return True


async def _switch_model(service: Service, new: Settings) -> str | None:
    """Load ``new.model`` on the engine thread; None on success, else why it failed."""
    log.info("model.switching", path=new.model.path, id=new.model.id or None)
    future = service.engine.request_load(new.model)
    try:
        await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        if future.cancelled():  # superseded by a newer request_load
            return "model switch superseded by a newer one"
        raise
    except Exception as exc:  # ModelLoadError and friends; engine logged model.load_failed
        return f"model {new.model.path!r} failed to load: {exc}"
    return None


def _apply_live(
    service: Service, old: Settings, new: Settings, changed: list[str], api_keys: list[str]
) -> None:
    """Swap the settings tree and push the changes that live outside it."""
    if any(k.startswith("logging.") for k in changed):
        if LOG_FILE_KEYS.intersection(changed):
            setup_logging(new.logging, new.log_path())
        else:
            set_level(new.logging.level)
    if any(k.startswith("engine.") for k in changed):
        service.engine.retune(new.engine)
    service.state.api_keys = api_keys
    service.settings = new
    service.state.settings = new


def _restart(service: Service, keys: list[str]) -> None:
    """Orderly shutdown, then cli re-executes the process (see ``cli._serve``)."""
    log.info("server.stopping", reason="restart", changed=keys)
    service.restart_requested = True
    service.state.shutting_down = True
    service.shutdown.set()
