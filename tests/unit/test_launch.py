"""``mlxd distributed``: the mlx.launch line, and the supervisor that keeps a group running.

The supervisor runs in a child process (signal handlers belong to a main thread) with
``launch.command`` replaced by a small shell "group": real processes, real signals, a real
process group. No MLX is imported.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import wait_until
from mlxd import launch
from mlxd.bench.harness import free_port
from mlxd.config import Settings


def test_command_for_local_ranks_and_hosts(tmp_path: Path) -> None:
    config = tmp_path / "mlxd.toml"
    local = launch.command(Settings(), config, local_ranks=3)
    assert local[1:7] == ["--backend", "ring", "--hosts", "127.0.0.1", "-n", "3"]
    assert local[-3:] == ["serve", "--config", str(config.resolve())]
    assert local[local.index("--") + 1 :][:3] == [sys.executable, "-m", "mlxd"]
    assert "--starting-port" in local and "32323" in local
    hosts = Settings.model_validate(
        {"distributed": {"hosts": ["10.0.0.1", "10.0.0.2"], "starting_port": 40000}}
    )
    argv = launch.command(hosts, config)
    assert argv[argv.index("--hosts") + 1] == "10.0.0.1,10.0.0.2"
    assert argv[argv.index("--starting-port") + 1] == "40000"
    assert argv[-2:] == ["--config", str(config.resolve())]
    hostfile = Settings.model_validate({"distributed": {"hostfile": "hosts.json"}})
    argv = launch.command(hostfile, config)
    assert argv[argv.index("--hostfile") + 1] == str(tmp_path / "hosts.json")
    assert "--hosts" not in argv


def start_supervisor(
    tmp_path: Path, group_script: str, *, port: int = 8765, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """A supervisor whose "group" is ``group_script`` (sh); rank 0 would answer on ``port``."""
    script = tmp_path / "group.sh"
    script.write_text(group_script)
    driver = textwrap.dedent(
        f"""
        import sys
        from mlxd import launch
        from mlxd.config import Settings
        launch.BACKOFF_FIRST = 0.2
        launch.STOP_GRACE_S = 5.0
        launch.command = lambda settings, config, local_ranks=0: ["sh", {str(script)!r}]
        settings = Settings.model_validate({{"server": {{"port": {port}}}}})
        sys.exit(launch.supervise(lambda: (settings, None)))
        """
    )
    return subprocess.Popen(
        [sys.executable, "-c", driver],
        cwd=tmp_path,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_supervisor_restarts_a_group_that_ends_with_back_off(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    sup = start_supervisor(tmp_path, f"date +%s.%N >> {starts}\nexit 1\n")
    try:
        wait_until(
            lambda: starts.exists() and len(starts.read_text().split()) >= 4,
            60,
            "four starts of the group",
        )
    finally:
        sup.send_signal(signal.SIGTERM)
        out, _ = sup.communicate(timeout=30)
    assert sup.returncode == 0, out
    # A group that ends at once is started again after a back-off that doubles.
    waits = [ln.rsplit(" ", 1)[-1] for ln in out.splitlines() if "starting it again" in ln]
    assert waits[:3] == ["0.2s", "0.4s", "0.8s"], out
    assert out.rstrip().endswith("mlxd distributed: stopped")


def test_stop_ends_every_process_of_the_group(tmp_path: Path) -> None:
    """SIGTERM to the supervisor reaches the whole group (mlx.launch and its local ranks),
    also a rank that ignores SIGTERM (SIGKILL after the grace period)."""
    pids = tmp_path / "pids"
    group = textwrap.dedent(
        f"""
        sleep 1000 & echo $! >> {pids}
        sh -c 'trap "" TERM; echo $$ >> {pids}; while :; do sleep 1; done' &
        wait
        """
    )
    sup = start_supervisor(tmp_path, group)
    try:
        wait_until(lambda: pids.exists() and len(pids.read_text().split()) == 2, 60, "two ranks")
    finally:
        sup.send_signal(signal.SIGTERM)
        out, _ = sup.communicate(timeout=120)
    assert sup.returncode == 0, out
    for pid in map(int, pids.read_text().split()):
        wait_until(lambda pid=pid: not _alive(pid), 10, f"rank process {pid} to end")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (ended, not yet reaped by its parent) counts as ended.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_sighup_starts_the_group_again(tmp_path: Path) -> None:
    """SIGHUP ends the running group and starts a new one at once (no back-off)."""
    pids = tmp_path / "pids"
    sup = start_supervisor(tmp_path, f"sleep 1000 & echo $! >> {pids}\nwait\n")
    try:
        wait_until(lambda: pids.exists() and len(pids.read_text().split()) == 1, 60, "a group")
        first = int(pids.read_text().split()[0])
        sup.send_signal(signal.SIGHUP)
        wait_until(lambda: len(pids.read_text().split()) == 2, 60, "the group started again")
        wait_until(lambda: not _alive(first), 30, "the first group to end")
    finally:
        sup.send_signal(signal.SIGTERM)
        out, _ = sup.communicate(timeout=120)
    assert sup.returncode == 0, out
    assert "SIGHUP: restarting the group" in out
    assert "starting it again" not in out  # no back-off: not a failure


def test_supervisor_hands_back_when_the_config_is_no_group_any_more() -> None:
    """``mlxd serve`` supervises while [distributed] names hosts; a config read for a start
    that names none makes it one process again (NOT_A_GROUP; nothing was started)."""
    before = signal.getsignal(signal.SIGTERM)
    code = launch.supervise(lambda: (Settings(), None), keep=lambda settings: False)
    assert code == launch.NOT_A_GROUP
    assert signal.getsignal(signal.SIGTERM) is before  # the caller's handlers are back


def test_systemd_hears_ready_from_the_supervisor_once_rank_0_answers(tmp_path: Path) -> None:
    """Under systemd (Type=notify, NotifyAccess=main) the supervisor is the main process: it
    sends READY=1 once rank 0's /health answers and STOPPING=1 when it stops the group; the
    ranks do not get the notify socket. Rank 0 here is a static HTTP server with a health
    file."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "health").write_text("ok")
    port = free_port()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(120)
    group = textwrap.dedent(
        f"""
        echo "${{NOTIFY_SOCKET:-unset}}" > {tmp_path / "rank-env"}
        sleep 1
        cd {site} && exec {sys.executable} -m http.server {port} --bind 127.0.0.1
        """
    )
    sup = start_supervisor(
        tmp_path, group, port=port, env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
    )
    try:
        ready = notify.recv(4096).decode()
        assert ready.startswith("READY=1\nSTATUS=serving through a group")
        assert (tmp_path / "rank-env").read_text().strip() == "unset"
    finally:
        sup.send_signal(signal.SIGTERM)
        out, _ = sup.communicate(timeout=120)
    assert notify.recv(4096) == b"STOPPING=1"
    notify.close()
    assert sup.returncode == 0, out
