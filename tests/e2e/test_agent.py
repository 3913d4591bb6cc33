"""Per-user service install: launchd plist and systemd user unit, with fake service managers.

``launchctl``, ``systemctl``, ``plutil`` and ``uv`` are small scripts written into a
temporary directory put first on PATH; each appends its argv to a calls file. HOME is a
temporary directory, so nothing touches the real user's LaunchAgents or systemd units.
The real launchctl/systemctl are never run here.
"""

from __future__ import annotations

import os
import plistlib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import ROOT, Daemon, free_port, run_command
from mlxd import agent

UID = os.getuid()
TARGET = f"gui/{UID}/{agent.LABEL}"

FAKE_LAUNCHCTL = """#!/bin/sh
# Models launchd's state: bootout fails unless bootstrapped; print fails once booted out.
echo "launchctl $*" >> "$FAKE_CALLS"
case "$1" in
  bootout) [ -f "$FAKE_STATE/loaded" ] || { echo "Boot-out failed: 3" >&2; exit 3; }
           rm -f "$FAKE_STATE/loaded" ;;
  bootstrap) touch "$FAKE_STATE/loaded" ;;
  print) [ -f "$FAKE_STATE/loaded" ] || exit 113 ;;
esac
exit 0
"""
FAKE_SYSTEMCTL = """#!/bin/sh
echo "systemctl $*" >> "$FAKE_CALLS"
case "$2" in is-failed) exit 1 ;; esac
exit 0
"""
FAKE_SIMPLE = """#!/bin/sh
echo "{name} $*" >> "$FAKE_CALLS"
exit 0
"""


@pytest.fixture
def sandbox(tmp_path: Path) -> dict[str, str]:
    """Environment with a temporary HOME and fake launchctl/systemctl/plutil/uv first on PATH."""
    bin_dir, state, home = tmp_path / "fakebin", tmp_path / "fakestate", tmp_path / "home"
    for d in (bin_dir, state, home):
        d.mkdir()
    scripts = {
        "launchctl": FAKE_LAUNCHCTL,
        "systemctl": FAKE_SYSTEMCTL,
        "plutil": FAKE_SIMPLE.format(name="plutil"),
        "uv": FAKE_SIMPLE.format(name="uv"),
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MLXD_") and k not in ("XDG_CONFIG_HOME", "XDG_STATE_HOME")
    }
    env.update(
        HOME=str(home),
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        FAKE_CALLS=str(tmp_path / "calls.log"),
        FAKE_STATE=str(state),
        USER="tester",
    )
    return env


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A valid config with a shutdown budget of 7.5 s (so stop timeouts are 18 s)."""
    path = tmp_path / "cfg" / "mlxd.toml"
    path.parent.mkdir()
    path.write_text(f"[server]\nport = {free_port()}\nshutdown_timeout_seconds = 7.5\n")
    return path


def agent_cmd(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_command([sys.executable, "-m", "mlxd.agent", *args], env=env)


def calls(env: dict[str, str]) -> list[str]:
    path = Path(env["FAKE_CALLS"])
    return path.read_text().splitlines() if path.exists() else []


def manager_calls(env: dict[str, str]) -> list[str]:
    return [c for c in calls(env) if c.startswith(("launchctl", "systemctl"))]


def test_launchd_install_writes_complete_plist_and_boots_in_order(
    sandbox: dict[str, str], config: Path
) -> None:
    """install writes a plist with every key launchd needs and runs bootout, enable, bootstrap."""
    proc = agent_cmd(
        sandbox, "install", "--platform", "launchd", "--no-wait", "--config", str(config)
    )
    assert proc.returncode == 0, proc.stderr
    home = Path(sandbox["HOME"])
    plist_path = home / "Library" / "LaunchAgents" / f"{agent.LABEL}.plist"
    data = plistlib.loads(plist_path.read_bytes())
    assert data["Label"] == agent.LABEL
    assert data["ProgramArguments"] == [
        str(ROOT / ".venv" / "bin" / "python"),
        "-m",
        "mlxd",
        "serve",
        "--config",
        str(config),
    ]
    assert data["RunAtLoad"] is True
    assert data["KeepAlive"] == {"SuccessfulExit": False}
    assert data["ThrottleInterval"] == 30
    assert data["ProcessType"] == "Interactive"
    assert data["ExitTimeOut"] == 18  # ceil(7.5) + 10
    assert data["WorkingDirectory"] == str(ROOT)
    env = data["EnvironmentVariables"]
    assert env["MLXD_CONFIG"] == str(config)
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PATH"].startswith(f"{ROOT}/.venv/bin:") and "/usr/bin" in env["PATH"]
    assert data["SoftResourceLimits"] == {"NumberOfFiles": agent.NOFILE_LIMIT}
    assert data["HardResourceLimits"] == {"NumberOfFiles": agent.NOFILE_LIMIT}
    logs = home / "Library" / "Logs" / "mlxd"
    assert Path(data["StandardOutPath"]).parent == logs
    assert Path(data["StandardErrorPath"]).parent == logs
    assert logs.is_dir()
    assert any(c.startswith("plutil -lint ") for c in calls(sandbox))
    assert manager_calls(sandbox) == [
        f"launchctl bootout {TARGET}",
        f"launchctl enable {TARGET}",
        f"launchctl bootstrap gui/{UID} {plist_path}",
    ]
    assert "/v1" in proc.stdout and str(config) in proc.stdout and "log:" in proc.stdout


def test_launchd_reinstall_boots_out_first_and_uninstall_removes(
    sandbox: dict[str, str], config: Path
) -> None:
    """A second install boots the loaded job out first and writes the same file; the real
    bin/uninstall-agent then boots it out and removes the plist."""
    args = ("install", "--platform", "launchd", "--no-wait", "--config", str(config))
    assert agent_cmd(sandbox, *args).returncode == 0
    plist_path = Path(sandbox["HOME"]) / "Library" / "LaunchAgents" / f"{agent.LABEL}.plist"
    first = plist_path.read_bytes()
    Path(sandbox["FAKE_CALLS"]).unlink()
    proc = agent_cmd(sandbox, *args)
    assert proc.returncode == 0, proc.stderr
    assert plist_path.read_bytes() == first
    assert manager_calls(sandbox) == [
        f"launchctl bootout {TARGET}",
        f"launchctl print {TARGET}",  # waits until the old job is gone
        f"launchctl enable {TARGET}",
        f"launchctl bootstrap gui/{UID} {plist_path}",
    ]
    Path(sandbox["FAKE_CALLS"]).unlink()
    uninstall = [str(ROOT / "bin" / "uninstall-agent"), "--platform", "launchd"]
    proc = run_command(uninstall, env=sandbox)
    assert proc.returncode == 0, proc.stderr
    assert not plist_path.exists()
    assert manager_calls(sandbox) == [f"launchctl bootout {TARGET}"]


def test_systemd_install_unit_verbs_reinstall_and_uninstall(
    sandbox: dict[str, str], config: Path
) -> None:
    """The systemd path writes a Type=notify unit with restart rules, runs daemon-reload,
    enable, restart; reinstalling gives the same file; uninstall disables and removes it."""
    args = ("install", "--platform", "systemd", "--no-wait", "--config", str(config))
    proc = agent_cmd(sandbox, *args)
    assert proc.returncode == 0, proc.stderr
    unit_path = Path(sandbox["HOME"]) / ".config" / "systemd" / "user" / "mlxd.service"
    unit = unit_path.read_text()
    lines = set(unit.splitlines())
    python = ROOT / ".venv" / "bin" / "python"
    expected = {
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={python} -m mlxd serve --config {config}",
        f"WorkingDirectory={ROOT}",
        f"Environment=MLXD_CONFIG={config}",
        "Environment=PYTHONUNBUFFERED=1",
        "Restart=on-failure",
        "RestartPreventExitStatus=78",
        "RestartSec=5",
        "TimeoutStartSec=300",
        "TimeoutStopSec=18",
        f"LimitNOFILE={agent.NOFILE_LIMIT}",
        "WantedBy=default.target",
    }
    assert expected <= lines, expected - lines
    assert any(ln.startswith(f"Environment=PATH={ROOT}/.venv/bin:") for ln in lines)
    verbs = [
        "systemctl --user daemon-reload",
        "systemctl --user enable mlxd.service",
        "systemctl --user restart --no-block mlxd.service",
    ]
    assert manager_calls(sandbox) == verbs
    assert agent_cmd(sandbox, *args).returncode == 0
    assert unit_path.read_text() == unit
    assert manager_calls(sandbox) == verbs * 2
    Path(sandbox["FAKE_CALLS"]).unlink()
    proc = agent_cmd(sandbox, "uninstall", "--platform", "systemd")
    assert proc.returncode == 0, proc.stderr
    assert not unit_path.exists()
    assert manager_calls(sandbox) == [
        "systemctl --user disable --now mlxd.service",
        "systemctl --user daemon-reload",
    ]


@pytest.mark.parametrize("platform", ["launchd", "systemd"])
def test_invalid_config_exits_78_and_writes_nothing(
    sandbox: dict[str, str], tmp_path: Path, platform: str
) -> None:
    """A config that does not validate stops the install with exit 78 before anything is
    written or any service manager is called."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nport = "eighty"\n')
    proc = agent_cmd(sandbox, "install", "--platform", platform, "--no-wait", "--config", str(bad))
    assert proc.returncode == 78
    assert "server.port" in proc.stderr and "not installing" in proc.stderr
    assert list(Path(sandbox["HOME"]).iterdir()) == []
    assert calls(sandbox) == []


def test_shell_mlxd_variables_are_ignored_with_a_warning(
    sandbox: dict[str, str], config: Path
) -> None:
    """The config is validated as the service reads it: MLXD_* variables of the installing
    shell (which the service will not see) are ignored, and the installer says so."""
    env = {**sandbox, "MLXD_SERVER__PORT": "not-a-port"}
    proc = agent_cmd(env, "install", "--platform", "systemd", "--no-wait", "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    assert "ignoring MLXD_SERVER__PORT" in proc.stderr


def test_bin_install_agent_dry_run_syncs_then_prints_and_touches_nothing(
    sandbox: dict[str, str], config: Path
) -> None:
    """The real bin/install-agent syncs the environment with uv (faked here), then --dry-run
    prints the file and the launchctl commands without writing or running anything."""
    proc = run_command(
        [
            str(ROOT / "bin" / "install-agent"),
            "--platform",
            "launchd",
            "--dry-run",
            "--config",
            str(config),
        ],
        env=sandbox,
    )
    assert proc.returncode == 0, proc.stderr
    uv_calls = [c for c in calls(sandbox) if c.startswith("uv ")]
    assert len(uv_calls) == 1
    assert "sync --frozen" in uv_calls[0] and "--no-dev --inexact" in uv_calls[0]
    assert manager_calls(sandbox) == []
    assert list(Path(sandbox["HOME"]).iterdir()) == []
    assert "<key>Label</key>" in proc.stdout
    assert f"would run: launchctl bootout {TARGET}" in proc.stdout
    assert f"would run: launchctl bootstrap gui/{UID} " in proc.stdout


def test_unit_and_plist_survive_awkward_paths(tmp_path: Path) -> None:
    """Paths with spaces, %, $ and & are quoted for systemd and escaped for the plist."""
    root = tmp_path / "my dir%1 $x & co"
    spec = agent.ServiceSpec(
        root=root,
        python=root / ".venv" / "bin" / "python",
        config_path=root / "etc" / "mlxd.toml",
        stop_timeout=30,
        health_url="http://127.0.0.1:1/health",
        endpoint="http://127.0.0.1:1/v1",
        log_path=tmp_path / "mlxd.log",
    )
    data = agent.validate_plist(agent.render_plist(spec, tmp_path))
    assert data["ProgramArguments"][0] == str(spec.python)
    assert data["WorkingDirectory"] == str(root)
    unit = agent.render_unit(spec)
    exec_line = next(ln for ln in unit.splitlines() if ln.startswith("ExecStart="))
    assert exec_line == (
        f'ExecStart="{tmp_path}/my dir%%1 $$x & co/.venv/bin/python" -m mlxd serve '
        f'--config "{tmp_path}/my dir%%1 $$x & co/etc/mlxd.toml"'
    )
    assert f'WorkingDirectory="{tmp_path}/my dir%%1 $x & co"' in unit


def test_wait_for_health_returns_once_daemon_is_ready(start_daemon: Callable[..., Daemon]) -> None:
    """The health wait polls a starting daemon and returns its /health body once it is 200."""
    daemon = start_daemon(wait=False)
    body = agent.wait_for_health(f"{daemon.base_url}/health", timeout=90, interval=0.2)
    assert body["status"] == "ok"
    assert body["model"]["id"] == "SmolLM2-135M-Instruct"


def test_wait_for_health_times_out_with_clear_error() -> None:
    """Against a closed port the wait gives up after its timeout and names the URL."""
    url = f"http://127.0.0.1:{free_port()}/health"
    with pytest.raises(agent.AgentError, match=r"did not answer .*/health with 200 within 1 s"):
        agent.wait_for_health(url, timeout=1.0, interval=0.1)


def test_wait_for_health_stops_early_when_the_manager_reports_failure() -> None:
    """When the service manager reports the start as failed, waiting stops with its reason."""
    url = f"http://127.0.0.1:{free_port()}/health"
    with pytest.raises(agent.AgentError, match="failed to start"):
        agent.wait_for_health(url, timeout=60, interval=0.1, failed=lambda: "unit failed to start")
