"""Local-user security: keys that cannot be empty, secrets never echoed, state files for the
owner only."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from mlxd.config import ConfigError, Settings, load_settings
from mlxd.filemodes import readable_by_others, secure_state


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_empty_api_key_is_a_config_error(tmp_path: Path) -> None:
    """``api_keys = [""]`` would accept an empty Bearer token: refused, with a hint."""
    cfg = tmp_path / "mlxd.toml"
    cfg.write_text('[security]\napi_keys = [""]\n')
    with pytest.raises(ConfigError, match="empty API key"):
        load_settings(cfg)


def test_exposed_host_with_empty_key_file_is_a_config_error(tmp_path: Path) -> None:
    """host 0.0.0.0 with an api_key_file that holds no keys refuses to start (it used to
    start unauthenticated on every interface)."""
    keys = tmp_path / "keys"
    keys.write_text("# no keys yet\n\n")
    settings = Settings(
        server={"host": "0.0.0.0"},  # type: ignore[arg-type]
        security={"api_key_file": str(keys)},  # type: ignore[arg-type]
    )
    with pytest.raises(ConfigError, match="holds no keys"):
        settings.api_keys()


def test_loopback_with_empty_key_file_stays_allowed(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("")
    assert Settings(security={"api_key_file": str(keys)}).api_keys() == []  # type: ignore[arg-type]


def test_secret_value_is_never_echoed_in_config_errors(tmp_path: Path) -> None:
    """A typo (a string instead of a list) names the key but not its value; the message goes
    to the log and to /health's last_reload.error."""
    cfg = tmp_path / "mlxd.toml"
    cfg.write_text('[security]\napi_keys = "sk-very-secret-value"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert "security.api_keys" in str(err.value)
    assert "sk-very-secret-value" not in str(err.value)


def test_secret_in_environment_is_never_echoed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLXD_SECURITY__API_KEYS", "sk-env-secret")
    with pytest.raises(ConfigError) as err:
        load_settings(None)
    assert "sk-env-secret" not in str(err.value)


def test_existing_state_is_tightened_to_owner_only(tmp_path: Path) -> None:
    """State left world-readable (dir 0755, files 0644) becomes 0700/0600 at start, and the
    changed paths are reported."""
    state = tmp_path / "state"
    settings = Settings(server={"state_dir": str(state)})  # type: ignore[arg-type]
    db, archive, log = settings.database_path(), settings.archive_path(), settings.log_path()
    dirs = [state, archive, archive / "2026", log.parent]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    files = [
        db,
        db.with_name(db.name + "-wal"),
        archive / "2026" / "c1.json",
        log,
        log.with_name(log.name + ".1"),
    ]
    for f in files:
        f.write_text("x")
        f.chmod(0o644)
    for d in dirs:
        d.chmod(0o755)
    changed = secure_state(settings, None)
    for f in files:
        assert mode(f) == 0o600, f
    for d in dirs:
        assert mode(d) == 0o700, d
    assert len(changed) == len(files) + len(dirs)
    assert secure_state(settings, None) == []  # nothing left to change


def test_readable_key_file_is_detected(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("k\n")
    keys.chmod(0o644)
    assert readable_by_others(keys)
    keys.chmod(0o600)
    assert not readable_by_others(keys)
