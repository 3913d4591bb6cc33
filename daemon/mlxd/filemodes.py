"""Who else on this machine may read mlxd's state: nobody.

Conversations (database, WAL, archives) and logs hold what users typed, so the daemon
creates them for its own user only: the serving process runs with umask 077 (directories
0700, files 0600, whatever creates them: SQLite's WAL, log rotation, archive writes). State
left readable by an older version is tightened at start, with one ``state.permissions_
tightened`` line naming what changed. An ``api_key_file`` or a config file holding keys that
others can read is reported (``security.secret_readable``), not changed: the user may share
it on purpose, but should know.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

from .config import Settings
from .logs import get_logger

log = get_logger("mlxd.filemodes")

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def restrict_new_files() -> None:
    """From now on this process creates files 0600 and directories 0700."""
    os.umask(0o077)


def secure_state(settings: Settings, config_path: Path | None) -> list[str]:
    """Tighten existing state to owner-only and warn about readable secrets.

    Returns the paths whose mode was changed (also logged).
    """
    changed = []
    for path, mode in _state_paths(settings):
        try:
            current = stat.S_IMODE(path.lstat().st_mode)
            if path.is_symlink() or (current & ~mode) == 0:
                continue
            path.chmod(current & mode)
        except OSError:
            continue  # vanished or not ours; nothing to tighten
        changed.append(str(path))
    if changed:
        log.warning("state.permissions_tightened", count=len(changed), paths=changed[:20])
    secrets = (
        [Path(settings.security.api_key_file).expanduser()]
        if settings.security.api_key_file
        else []
    )
    if config_path is not None and settings.security.api_keys:
        secrets.append(config_path)
    for path in secrets:
        if readable_by_others(path):
            log.warning(
                "security.secret_readable",
                path=str(path),
                hint=f"it holds API keys and others can read it; run: chmod 600 {path}",
            )
    return changed


def readable_by_others(path: Path) -> bool:
    """True when users other than the owner may read ``path`` (group or world bits)."""
    try:
        return bool(path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH))
    except OSError:
        return False


def _state_paths(settings: Settings) -> Iterator[tuple[Path, int]]:
    state_dir = settings.state_dir()
    yield state_dir, PRIVATE_DIR
    db = settings.database_path()
    for suffix in ("", "-wal", "-shm", "-journal"):
        yield db.with_name(db.name + suffix), PRIVATE_FILE
    archive = settings.archive_path()
    yield archive, PRIVATE_DIR
    if archive.is_dir():
        for path in archive.rglob("*"):
            yield path, PRIVATE_DIR if path.is_dir() else PRIVATE_FILE
    log_file = settings.log_path()
    if log_file.parent.is_relative_to(state_dir) or log_file.parent.name == "mlxd":
        yield log_file.parent, PRIVATE_DIR  # a directory of mlxd's own, not e.g. /var/log
    if log_file.parent.is_dir():
        for path in log_file.parent.glob(log_file.name + "*"):
            yield path, PRIVATE_FILE
