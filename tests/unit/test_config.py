"""Configuration: precedence, validation messages, exit status 78, docs kept in step."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import run_mlxd
from mlxd import config
from mlxd.config import ConfigError, load_settings

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mlxd.toml"
    path.write_text(text)
    return path


def test_empty_file_is_valid_and_serves_bundled_model(tmp_path: Path) -> None:
    """Every key has a default; the default model is the bundled SmolLM2."""
    s = load_settings(write(tmp_path, ""))
    assert s.model.path == "bundled:SmolLM2-135M-Instruct"
    assert s.server.host == "127.0.0.1"
    assert s.conversations.ttl_seconds == 3600


def test_env_beats_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLXD_<SECTION>__<KEY> overrides the file, which overrides the default."""
    path = write(tmp_path, "[server]\nport = 1234\n[logging]\nlevel = 'debug'\n")
    assert load_settings(path).server.port == 1234
    monkeypatch.setenv("MLXD_SERVER__PORT", "9000")
    s = load_settings(path)
    assert s.server.port == 9000
    assert s.logging.level == "debug"


def test_settings_are_frozen(tmp_path: Path) -> None:
    """The tree is immutable: a reload builds a new one instead of mutating."""
    s = load_settings(write(tmp_path, ""))
    with pytest.raises(Exception, match="frozen"):
        s.server.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[server]\nprot = 1\n", "server.prot: unknown key"),
        ("[sever]\nport = 1\n", "unknown section [sever]"),
        ("[server]\nport = 'abc'\n", "server.port"),
        ("[conversations]\nttl_seconds = -5\n", "conversations.ttl_seconds"),
        ("[model]\ntemperature = 5\n", "model.temperature"),
        ("[server\nport = 1\n", "not valid TOML"),
        ("[server]\nhost = '0.0.0.0'\n", "not a loopback address"),
        ("[engine]\nmax_queue = true\n", "engine.max_queue: must be a number, not true"),
        ("[server]\nbody_timeout_seconds = false\n", "must be a number, not false"),
        ("[engine]\nmax_batch_size = true\n", "from 1 to 256, not true"),
        ("[engine]\nmax_batch_size = 0\n", "engine.max_batch_size: must be 'auto' or a whole"),
        ("[engine]\nmax_batch_size = 300\n", "from 1 to 256, not 300"),
        ("[engine]\nmax_batch_size = 8.5\n", "not 8.5"),
        ("[engine]\nmax_batch_size = 'lots'\n", "not 'lots'"),
    ],
)
def test_errors_name_the_key_and_the_fix(tmp_path: Path, text: str, needle: str) -> None:
    """Each kind of mistake is reported with the dotted key path (or section) and a hint."""
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, text))
    assert needle in str(err.value)


def test_max_batch_size_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """'auto' in any case, numbers as TOML ints, whole floats or strings (an environment
    variable is a string); one line of error for anything else (above)."""
    for text, want in (
        ("8", 8),
        ("'16'", 16),
        ("'auto'", "auto"),
        ("' AUTO '", "auto"),
        ("8.0", 8),
    ):
        got = load_settings(write(tmp_path, f"[engine]\nmax_batch_size = {text}\n"))
        assert got.engine.max_batch_size == want, text
    assert load_settings(None).engine.max_batch_size == "auto"
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, "[engine]\nmax_batch_size = 0\n"))
    assert str(err.value).count("engine.max_batch_size") == 1
    monkeypatch.setenv("MLXD_ENGINE__MAX_BATCH_SIZE", "12")  # the environment beats the file
    assert load_settings(None).engine.max_batch_size == 12


def test_unknown_key_lists_valid_keys(tmp_path: Path) -> None:
    """The hint for a misspelt key lists the section's valid keys."""
    with pytest.raises(ConfigError, match="valid keys in \\[server\\]: host, port"):
        load_settings(write(tmp_path, "[server]\nprot = 1\n"))


def test_non_loopback_with_key_is_allowed(tmp_path: Path) -> None:
    """Binding to all interfaces is accepted once an API key is configured."""
    s = load_settings(write(tmp_path, "[server]\nhost='0.0.0.0'\n[security]\napi_keys=['k1']\n"))
    assert s.server.host == "0.0.0.0"


def test_relative_paths_resolve_under_state_dir(tmp_path: Path) -> None:
    """database, archive_dir and logging.file resolve against server.state_dir."""
    s = load_settings(write(tmp_path, f"[server]\nstate_dir = '{tmp_path}/st'\n"))
    assert s.database_path() == tmp_path / "st" / "conversations.sqlite3"
    assert s.archive_path() == tmp_path / "st" / "conversation_logs"
    if sys.platform != "darwin":
        assert s.log_path() == tmp_path / "st" / "logs" / "mlxd.log"


def test_api_key_file_is_read(tmp_path: Path) -> None:
    """Keys come from the list and from the key file (comments and blanks skipped)."""
    keyfile = tmp_path / "keys"
    keyfile.write_text("# mine\nalpha\n\nbeta\n")
    s = load_settings(write(tmp_path, f"[security]\napi_keys=['x']\napi_key_file='{keyfile}'\n"))
    assert s.api_keys() == ["x", "alpha", "beta"]


def test_bad_config_exits_78_with_message(tmp_path: Path) -> None:
    """The CLI exits with EX_CONFIG (78) and the message on stderr: service managers stop."""
    path = write(tmp_path, "[server]\nprot = 1\n")
    result = run_mlxd("--config", str(path), "check-config")
    assert result.returncode == 78
    assert "server.prot: unknown key" in result.stderr
    missing = run_mlxd("--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 78
    assert "does not exist" in missing.stderr
    exposed = run_mlxd("--config", str(write(tmp_path, "[server]\nhost='0.0.0.0'\n")))
    assert exposed.returncode == 78
    assert "api_keys" in exposed.stderr


def test_check_config_prints_effective_config_with_masked_keys(tmp_path: Path) -> None:
    """check-config validates, prints JSON with env overrides applied, and never a key."""
    path = write(tmp_path, "[security]\napi_keys = ['sekrit-key']\n")
    result = run_mlxd("--config", str(path), "check-config", env={"MLXD_SERVER__PORT": "9123"})
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["settings"]["server"]["port"] == 9123
    assert "sekrit-key" not in result.stdout
    assert out["backend"]["device"] in ("cpu", "gpu")


def test_shipped_config_is_the_documented_defaults() -> None:
    """etc/mlxd.toml is exactly what the settings model renders: every key, its default, doc."""
    assert (ROOT / "etc" / "mlxd.toml").read_text() == config.render_toml()
    assert load_settings(ROOT / "etc" / "mlxd.toml") == load_settings(None)


def test_readme_config_table_is_current() -> None:
    """The README's configuration table is rendered from the same Field descriptions."""
    assert config.render_markdown() in (ROOT / "README.md").read_text()
