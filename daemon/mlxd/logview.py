"""``mlxd logs``: the JSON-lines log file, rendered for a person.

One line per event, aligned, with the canonical request line summarised::

    2026-11-25 01:42:24 INFO  request.completed    POST /v1/chat/completions 200 1662ms
        model=... tokens=37/7 id=req_...            (one line on screen)

History comes from the rotated files (``mlxd.log.5`` ... ``mlxd.log.1``, oldest first) and
then the current file. ``--follow`` polls the file and survives rotation (the old file is
drained, then the new one is read from its start) and truncation. Lines that are not JSON
(a line cut short by a crash) are shown as they are; they pass ``--level`` but not
``--request-id`` or ``--event``, which they cannot match.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, tzinfo
from pathlib import Path
from typing import IO, Any

from .config import Settings

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
_LABELS = {
    "debug": "DEBUG",
    "info": "INFO",
    "warning": "WARN",
    "error": "ERROR",
    "critical": "CRIT",
    "exception": "ERROR",
}
_COLORS = {
    "DEBUG": "\x1b[2m",
    "INFO": "\x1b[32m",
    "WARN": "\x1b[33m",
    "ERROR": "\x1b[1;31m",
    "CRIT": "\x1b[1;31m",
}
_BOLD, _DIM, _RESET = "\x1b[1m", "\x1b[2m", "\x1b[0m"
_EVENT_WIDTH = 20
#: Fields that are the line's frame, or too noisy to repeat on every line.
_HIDDEN = ("timestamp", "level", "event", "logger", "request_id", "exception", "message")


def parse(line: str) -> dict[str, Any] | None:
    """The event of a log line, or None for a line that is not a JSON object."""
    try:
        data = json.loads(line)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class Filters:
    """Which lines to show: level at least ``level``, exact request id, event name prefix."""

    level: int = 0
    request_id: str | None = None
    event: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Filters:
        level = 0
        if args.level:
            name = args.level.lower()
            if name not in LEVELS:
                raise ValueError(f"unknown level {args.level!r}; use one of {', '.join(LEVELS)}")
            level = LEVELS[name]
        return cls(level, args.request_id or None, args.event or None)

    def match(self, line: str) -> bool:
        if not line.strip():
            return False
        data = parse(line)
        if data is None:
            return self.request_id is None and self.event is None
        if self.level and LEVELS.get(str(data.get("level", "")).lower(), self.level) < self.level:
            return False
        if self.request_id is not None and data.get("request_id") != self.request_id:
            return False
        return self.event is None or str(data.get("event", "")).startswith(self.event)


# Rendering ----------------------------------------------------------------------------
def _value(value: Any) -> str:
    if isinstance(value, str):
        if value and not any(c.isspace() or c in "\"'=" for c in value):
            return value
        return json.dumps(value, ensure_ascii=False)
    return json.dumps(value, ensure_ascii=False, default=str)


def _time(raw: Any, tz: tzinfo | None) -> str:
    try:
        stamp = datetime.fromisoformat(str(raw))
    except ValueError:
        return str(raw)
    if stamp.tzinfo is not None:
        stamp = stamp.astimezone(tz)  # tz None: the local zone
    return stamp.strftime("%Y-%m-%d %H:%M:%S")


def _request_summary(data: dict[str, Any]) -> list[str]:
    """``POST /v1/chat/completions 200 1662ms model=... tokens=37/7`` for request.completed."""
    head = [str(data.pop(k)) for k in ("method", "path", "status") if data.get(k) is not None]
    duration = data.pop("duration_ms", None)
    if isinstance(duration, int | float):
        head.append(f"{duration:.0f}ms" if duration >= 10 else f"{duration:.1f}ms")
    parts = [" ".join(head)] if head else []
    model = data.pop("model", None)
    if model:
        parts.append(f"model={_value(model)}")
    prompt, completion = data.pop("prompt_tokens", None), data.pop("completion_tokens", None)
    if prompt is not None or completion is not None:
        parts.append(
            f"tokens={'-' if prompt is None else prompt}/"
            f"{'-' if completion is None else completion}"
        )
    return parts


def format_line(line: str, *, color: bool = False, tz: tzinfo | None = None) -> str:
    """One log line for a person; a line that is not JSON comes back unchanged."""
    data = parse(line)
    if data is None:
        return line.rstrip("\r\n")
    stamp = _time(data.get("timestamp", ""), tz)
    raw_level = str(data.get("level", "")).lower()
    level = _LABELS.get(raw_level, raw_level.upper()[:5])
    event = str(data.get("event", ""))
    fields = {k: v for k, v in data.items() if k not in _HIDDEN}
    parts = _request_summary(fields) if event == "request.completed" else []
    if data.get("message"):
        parts.append(str(data["message"]))
    parts += [f"{k}={_value(v)}" for k, v in fields.items() if v is not None]
    if data.get("request_id"):
        parts.append(f"id={data['request_id']}")
    level_col, event_col = f"{level:<5}", f"{event:<{_EVENT_WIDTH}}"
    if color:
        level_col = f"{_COLORS.get(level, '')}{level_col}{_RESET}"
        event_col = f"{_BOLD}{event_col}{_RESET}"
        stamp = f"{_DIM}{stamp}{_RESET}"
    out = f"{stamp} {level_col} {event_col} {' '.join(parts)}".rstrip()
    exception = data.get("exception")
    if exception:
        out += "\n" + "\n".join(f"    {ln}" for ln in str(exception).rstrip().splitlines())
    return out


# Reading ------------------------------------------------------------------------------
def log_files(path: Path) -> list[Path]:
    """The rotated files then the current one, oldest first (mlxd.log.2, mlxd.log.1, mlxd.log)."""
    rotated = []
    for candidate in path.parent.glob(f"{path.name}.*"):
        suffix = candidate.name[len(path.name) + 1 :]
        if suffix.isdigit() and candidate.is_file():
            rotated.append((int(suffix), candidate))
    files = [p for _, p in sorted(rotated, reverse=True)]
    return [*files, path] if path.exists() else files


def _lines(data: bytes) -> list[str]:
    return data.decode("utf-8", errors="replace").splitlines()


class Follower:
    """Reads a growing log file line by line, across rotation and truncation.

    The first :meth:`poll` returns the whole current file; later ones return what was
    appended since. Only complete lines are returned; a partial last line waits.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: IO[bytes] | None = None
        self._inode: int | None = None
        self._pending = b""

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def _open(self) -> bool:
        try:
            self._fh = self.path.open("rb")
        except OSError:
            return False
        self._inode = os.fstat(self._fh.fileno()).st_ino
        self._pending = b""
        return True

    def _read(self, *, final: bool = False) -> list[str]:
        assert self._fh is not None
        *complete, self._pending = (self._pending + self._fh.read()).split(b"\n")
        if final and self._pending:
            complete.append(self._pending)
            self._pending = b""
        return [raw.decode("utf-8", errors="replace") for raw in complete]

    def poll(self) -> list[str]:
        """The complete lines written since the last call."""
        if self._fh is None and not self._open():
            return []
        lines = self._read()
        try:
            stat = self.path.stat()
        except OSError:
            return lines  # rotated away; the new file appears in a moment
        if stat.st_ino != self._inode:
            lines += self._read(final=True)  # drain the rotated file, then switch
            self.close()
            if self._open():
                lines += self._read()
        elif self._fh is not None and stat.st_size < self._fh.tell():
            self._fh.seek(0)  # truncated in place: start over
            self._pending = b""
            lines += self._read()
        return lines


def history(path: Path, n: int, filters: Filters, follower: Follower) -> list[str]:
    """The last ``n`` matching lines, oldest first; ``follower`` is left at the end of the file."""
    current = follower.poll()
    if n <= 0:
        return []
    matched: list[str] = []
    for chunk in _newest_first(path, current):
        for line in reversed(chunk):
            if filters.match(line):
                matched.append(line)
                if len(matched) >= n:
                    return matched[::-1]
    return matched[::-1]


def _newest_first(path: Path, current: list[str]) -> Iterator[list[str]]:
    yield current
    for rotated in reversed(log_files(path)):
        if rotated != path:
            try:
                yield _lines(rotated.read_bytes())
            except OSError:
                continue


def follow(
    follower: Follower,
    emit: Callable[[str], None],
    *,
    interval: float = 0.25,
    stop: threading.Event | None = None,
    max_polls: int | None = None,
) -> None:
    """Pass each new line to ``emit`` until ``stop`` is set or ``max_polls`` polls are done."""
    stop = stop or threading.Event()
    polls = 0
    while not stop.is_set():
        for line in follower.poll():
            emit(line)
        polls += 1
        if max_polls is not None and polls >= max_polls:
            return
        stop.wait(interval)


def run(settings: Settings, args: argparse.Namespace) -> int:
    """``mlxd logs``: print history (``-n``), then follow (``-f``) if asked."""
    try:
        filters = Filters.from_args(args)
    except ValueError as exc:
        print(f"mlxd logs: {exc}", file=sys.stderr)
        return 2
    path = settings.log_path()
    if not args.follow and not log_files(path):
        print(f"mlxd logs: no log file at {path} yet (has mlxd run?)", file=sys.stderr)
        return 1
    color = not args.json and sys.stdout.isatty() and "NO_COLOR" not in os.environ

    def show(line: str) -> None:
        print(line.rstrip("\r\n") if args.json else format_line(line, color=color), flush=True)

    def emit(line: str) -> None:
        if filters.match(line):
            show(line)

    follower = Follower(path)
    try:
        for line in history(path, args.lines, filters, follower):
            show(line)
        if args.follow:
            with contextlib.suppress(KeyboardInterrupt):
                follow(follower, emit)
    except BrokenPipeError:
        # `mlxd logs | head`: the reader left; exit quietly without a second error at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        follower.close()
    return 0
