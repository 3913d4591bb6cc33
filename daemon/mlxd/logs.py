"""One logging pipeline: structlog renders everything, stdlib records included.

mlxd's own events are structlog events with stable ``noun.verb`` names
(``request.completed``, ``model.loaded``). hypercorn's and Quart's stdlib records pass through
``structlog.stdlib.ProcessorFormatter`` so they come out in the same shape. The file always
gets JSON lines (``timestamp``, ``level``, ``event`` first); standard error gets readable
console output on a terminal and JSON otherwise (launchd/systemd capture it).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import stat
import sys
from pathlib import Path
from typing import Any

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from .config import LoggingSettings

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
#: Keys never written to a log line, whatever an event carries.
_SECRET_KEYS = frozenset({"authorization", "api_key", "api_keys", "password", "body"})
_HANDLER_TAG = "_mlxd_handler"


def _drop_secrets(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    for key in _SECRET_KEYS & event_dict.keys():
        event_dict[key] = "***"
    return event_dict


def _stdlib_event_name(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    # Records from hypercorn/quart carry free text in "event"; keep it as "message" and give
    # them a stable event name so `mlxd logs` can filter them.
    record = event_dict.get("_record")
    if record is not None and not event_dict.get("_from_structlog"):
        event_dict["message"] = event_dict.pop("event", "")
        event_dict["event"] = f"{record.name.split('.')[0]}.log"
    return event_dict


_SHARED: list[Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
    _drop_secrets,
]


def _order_keys(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    head = {k: event_dict.pop(k) for k in ("timestamp", "level", "event") if k in event_dict}
    return {**head, **event_dict}


def setup_logging(
    settings: LoggingSettings, log_file: Path | None, *, console: bool = True
) -> None:
    """Configure structlog and the stdlib root logger. Safe to call again (replaces handlers)."""
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_SHARED,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    pre_chain: list[Processor] = [*_SHARED, structlog.stdlib.ExtraAdder()]
    json_formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=pre_chain,
        processors=[
            _stdlib_event_name,
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _order_keys,
            structlog.processors.JSONRenderer(default=str),
        ],
    )
    root = logging.getLogger()
    # The new handlers are built first: if the file cannot be opened (OSError), the old
    # ones keep logging (a reload that drops them would leave the daemon silent).
    handlers: list[logging.Handler] = []
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler: logging.Handler
        if settings.max_bytes > 0:
            file_handler = logging.handlers.RotatingFileHandler(
                log_file,
                maxBytes=settings.max_bytes,
                backupCount=settings.backup_count,
                encoding="utf-8",
            )
        else:
            file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(json_formatter)
        handlers.append(file_handler)
    if console:
        stream = logging.StreamHandler(sys.stderr)
        use_console = settings.format == "console" or (
            settings.format == "auto" and sys.stderr.isatty()
        )
        if use_console:
            stream.setFormatter(
                structlog.stdlib.ProcessorFormatter(
                    foreign_pre_chain=pre_chain,
                    processors=[
                        _stdlib_event_name,
                        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()),
                    ],
                )
            )
        else:
            stream.setFormatter(json_formatter)
        if log_file is not None and _stderr_is_regular_file():
            # launchd's StandardErrorPath is a plain file nobody rotates: it would grow
            # forever with a copy of the log. Keep only warnings and errors there.
            stream.setLevel(logging.WARNING)
        handlers.append(stream)
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_TAG, False):
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        setattr(handler, _HANDLER_TAG, True)
        root.addHandler(handler)
    set_level(settings.level)
    # hypercorn's access log duplicates request.completed; its error log is kept.
    logging.getLogger("hypercorn.access").disabled = True


def _stderr_is_regular_file() -> bool:
    try:
        return stat.S_ISREG(os.fstat(sys.stderr.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):
        return False


def set_level(level: str) -> None:
    """Change the level live (config reload)."""
    logging.getLogger().setLevel(_LEVELS[level])


def get_logger(name: str = "mlxd") -> Any:
    """A structlog logger; events are ``noun.verb`` strings with keyword fields."""
    return structlog.stdlib.get_logger(name)
