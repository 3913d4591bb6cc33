"""The one daemon harness: start a server as a subprocess on a free loopback port, wait until
its ``/health`` answers, stop it without leaving anything behind.

``bin/bench`` (mlxd and ``mlx_lm.server``), the end-to-end tests (``tests/conftest.py``
builds its ``Daemon`` fixtures on :class:`Daemon`) and ``bin/gpu_bench.py`` all start their
servers here, so a change to how mlxd is launched or judged ready is made once.

Standard library only: it runs where mlx must not be imported yet (the bench chooses the BLAS
per process) and on machines that have mlxd's source but not its test tools.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

#: How long a daemon gets to answer ``/health`` when the caller does not say.
START_TIMEOUT = 90.0


class HarnessError(Exception):
    """A server under test cannot go on (exited, never ready); the message says which and why."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any ``MLXD_*`` (the caller's own daemon settings
    must not leak into a server under test), unbuffered, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXD_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def get_json(
    port: int, path: str, timeout: float = 5.0, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """``GET path`` on 127.0.0.1: (status, parsed JSON body, or the text if it is not JSON).
    Pass the server's ``headers`` (its key): without one, mlxd's /health says only status."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw or b"null")
        except json.JSONDecodeError:
            return resp.status, raw.decode("utf-8", "replace")
    finally:
        conn.close()


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM if its parent dies without cleaning up (even SIGKILL)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn(
    cmd: Sequence[str],
    env: dict[str, str],
    log: Path,
    *,
    cwd: Path | None = None,
    isolate: bool = False,
    pipes: bool = False,
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` with stdout and stderr in ``log``.

    ``isolate``: its own session (Ctrl-C reaches only the caller, which stops it) and, on
    Linux, SIGTERM when the caller dies. Only for callers that spawn from their main thread
    with no other threads running (the bench): ``preexec_fn`` is not thread-safe.
    ``pipes``: stdin and stdout are pipes to the caller (a worker it talks to); only stderr
    goes to ``log``.
    """
    with log.open("wb") as out:
        return subprocess.Popen(
            list(cmd),
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipes else out,
            stderr=out if pipes else subprocess.STDOUT,
            start_new_session=isolate,
            preexec_fn=_die_with_parent if isolate else None,
        )


def log_tail(log: Path, n: int = 2000) -> str:
    """The last ``n`` characters of a child's log ("" if it cannot be read)."""
    try:
        return log.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def terminate(
    proc: subprocess.Popen[bytes], timeout: float = 30.0, sig: int = signal.SIGTERM
) -> int | None:
    """``sig`` (SIGTERM), wait up to ``timeout``, then SIGKILL: never leaves the process behind."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(10)
    return proc.returncode


@dataclass
class Server:
    """One server process on a loopback port: its log, its command, and what /health said."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    command: list[str]
    info: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)  # Authorization, when keys are set

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 2000) -> str:
        return log_tail(self.log, n)

    def poll_ready(self) -> dict[str, Any] | None:
        """The /health body once ready, else None; raises if the process has exited."""
        if self.process.poll() is not None:
            raise HarnessError(
                f"{self.name} exited with {self.process.returncode} before it was ready:\n"
                f"{self.log_tail()}"
            )
        try:
            status, body = get_json(self.port, "/health", timeout=2.0, headers=self.headers)
        except (OSError, http.client.HTTPException):
            return None
        if status != 200:
            return None
        return body if isinstance(body, dict) else {}

    def wait_ready(self, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        """Block until /health answers 200; returns its body (also kept in ``info``)."""
        wait_ready([self], timeout)
        return dict(self.info["health"])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Signal, wait, SIGKILL if it is still there; returns the exit status."""
        return terminate(self.process, timeout, sig)


def wait_ready(servers: Sequence[Server], timeout: float) -> None:
    """Wait for every server at once, so one that dies is reported without delay."""
    deadline = time.monotonic() + timeout
    pending = list(servers)
    while pending:
        for s in list(pending):
            health = s.poll_ready()
            if health is not None:
                s.info["health"] = health
                pending.remove(s)
        if pending and time.monotonic() > deadline:
            names = ", ".join(s.name for s in pending)
            raise HarnessError(f"{names} not ready after {timeout:.0f}s:\n{pending[0].log_tail()}")
        if pending:
            time.sleep(0.2)


@dataclass(kw_only=True)
class Daemon(Server):
    """``python -m mlxd`` with its own config file and state directory."""

    state_dir: Path
    config_path: Path
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    isolate: bool = False

    @property
    def log_path(self) -> Path:
        """The daemon's own JSON log file (``logging.file`` under its state directory)."""
        return self.state_dir / "logs" / "mlxd.log"

    def log_events(self) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        return [json.loads(ln) for ln in self.log_path.read_text().splitlines() if ln.strip()]

    @classmethod
    def start(
        cls,
        config_path: Path,
        *,
        state_dir: Path,
        log: Path,
        port: int | None = None,
        pin_port: bool = True,
        env: dict[str, str] | None = None,
        args: Sequence[str] = (),
        command: Sequence[str] | None = None,
        cwd: Path | None = None,
        isolate: bool = False,
        name: str = "mlxd",
    ) -> Self:
        """Start mlxd on ``port`` (free if None) with JSON logs; does not wait for ready.

        ``pin_port=False`` leaves the port to the config file (``MLXD_SERVER__PORT`` would
        beat it); ``port`` is then only where this object looks. ``command`` replaces
        ``python -m mlxd`` (e.g. ``bin/mlxd``); ``--config`` and ``args`` follow it.
        """
        port = port or free_port()
        extra = {"MLXD_SERVER__STATE_DIR": str(state_dir), "MLXD_LOGGING__FORMAT": "json"}
        if pin_port:
            extra["MLXD_SERVER__PORT"] = str(port)
        full_env = child_env(extra | (env or {}))
        cmd = [*(command or (sys.executable, "-m", "mlxd")), "--config", str(config_path), *args]
        process = spawn(cmd, full_env, log, cwd=cwd, isolate=isolate)
        daemon = cls(name, port, process, log, cmd, state_dir=state_dir, config_path=config_path)
        daemon.env = full_env
        daemon.cwd, daemon.isolate = cwd, isolate
        return daemon

    def restart(self, timeout: float = START_TIMEOUT) -> Self:
        """Stop this process and start the same command on the same port and state directory
        (what survives a restart is what the bench measures); waits until it is ready."""
        self.stop()
        log = self.log.with_name(f"{self.log.stem}.restarted{self.log.suffix}")
        process = spawn(self.command, self.env, log, cwd=self.cwd, isolate=self.isolate)
        again = dataclasses.replace(self, process=process, log=log, info={})
        again.wait_ready(timeout)
        return again


def start_reference(
    model: str, port: int, log: Path, extra_args: Sequence[str] = (), *, cwd: Path | None = None
) -> Server:
    """``mlx_lm.server`` on ``model`` with its default settings (plus ``extra_args``)."""
    cmd = [
        sys.executable,
        "-m",
        "mlx_lm",
        "server",
        "--model",
        model,
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        *extra_args,
    ]
    process = spawn(cmd, child_env(), log, cwd=cwd, isolate=True)
    return Server("mlx_lm.server", port, process, log, cmd, {"model": model})
