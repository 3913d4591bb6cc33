"""The service managers: launchd (macOS) and systemd user units (elsewhere) write, load
and stop the service; ``wait_for_health`` waits for the started daemon to answer."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
import urllib.error
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import loopback_opener
from .render import (
    HEALTH_TIMEOUT_SECONDS,
    LABEL,
    UNIT_NAME,
    AgentError,
    ServiceSpec,
    launchd_log_dir,
    render_plist,
    render_unit,
    systemd_unit_path,
    validate_plist,
)


# Running commands ---------------------------------------------------------------------
class Runner:
    """Runs service-manager commands, or only prints them (``--dry-run``)."""

    def __init__(self, dry_run: bool) -> None:
        self.dry_run = dry_run

    def __call__(self, argv: list[str], *, check: bool = True) -> int:
        if self.dry_run:
            print(f"would run: {shlex.join(argv)}")
            return 0
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        except FileNotFoundError:
            raise AgentError(f"{argv[0]} not found on PATH") from None
        except subprocess.TimeoutExpired:
            raise AgentError(f"{shlex.join(argv)} did not finish within 120 s") from None
        if check and proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip()
            raise AgentError(f"{shlex.join(argv)} failed with status {proc.returncode}: {detail}")
        return proc.returncode


def _write(path: Path, content: str, *, lint: Callable[[Path], None] | None = None) -> None:
    """Write via a temporary file in the same directory, lint it, then rename over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(content, encoding="utf-8")
    try:
        if lint is not None:
            lint(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class Launchd:
    """``~/Library/LaunchAgents/<label>.plist`` in the ``gui/<uid>`` domain."""

    name = "launchd"

    def __init__(self, home: Path, run: Runner) -> None:
        self.home = home
        self.run = run
        self.domain = f"gui/{os.getuid()}"
        self.target = f"{self.domain}/{LABEL}"

    @property
    def path(self) -> Path:
        return self.home / "Library" / "LaunchAgents" / f"{LABEL}.plist"

    def render(self, spec: ServiceSpec) -> str:
        content = render_plist(spec, self.home)
        validate_plist(content)
        return content

    def _lint(self, path: Path) -> None:
        if shutil.which("plutil"):
            self.run(["plutil", "-lint", str(path)])

    def install(self, content: str, spec: ServiceSpec) -> None:
        if not self.run.dry_run:
            launchd_log_dir(self.home).mkdir(parents=True, exist_ok=True)
            _write(self.path, content, lint=self._lint)
        # bootout first, so a reinstall replaces the loaded job; it fails when not loaded.
        if self.run(["launchctl", "bootout", self.target], check=False) == 0:
            self._wait_unloaded(spec.stop_timeout + 5.0)
        self.run(["launchctl", "enable", self.target])
        self.run(["launchctl", "bootstrap", self.domain, str(self.path)])

    def _wait_unloaded(self, timeout: float) -> None:
        # bootout can return before the job is gone; bootstrap would then fail with EIO.
        if self.run.dry_run:
            return
        deadline = time.monotonic() + timeout
        while self.run(["launchctl", "print", self.target], check=False) == 0:
            if time.monotonic() > deadline:
                raise AgentError(f"{self.target} is still loaded {timeout:g} s after bootout")
            time.sleep(0.5)

    def uninstall(self) -> None:
        self.run(["launchctl", "bootout", self.target], check=False)
        if not self.run.dry_run:
            self.path.unlink(missing_ok=True)

    def failed(self) -> str | None:
        return None  # launchd restarts (throttled); the health timeout reports it

    def hints(self) -> list[str]:
        logs = launchd_log_dir(self.home)
        return [
            f"  stderr:  {logs / 'launchd.stderr.log'}",
            f"  status:  launchctl print {self.target}",
        ]


class Systemd:
    """``~/.config/systemd/user/mlxd.service`` in the user's systemd instance."""

    name = "systemd"

    def __init__(self, home: Path, run: Runner) -> None:
        self.home = home
        self.run = run

    @property
    def path(self) -> Path:
        return systemd_unit_path(self.home)

    def render(self, spec: ServiceSpec) -> str:
        return render_unit(spec)

    def _ctl(self, *args: str, check: bool = True) -> int:
        try:
            return self.run(["systemctl", "--user", *args], check=check)
        except AgentError as exc:
            raise AgentError(
                f"{exc}. Hint: a systemd user instance must be running (a login session, or "
                "`loginctl enable-linger`); otherwise run bin/mlxd in the foreground."
            ) from None

    def install(self, content: str, spec: ServiceSpec) -> None:
        if not self.run.dry_run:
            _write(self.path, content)
        self._ctl("daemon-reload")
        self._ctl("enable", UNIT_NAME)
        # restart starts a stopped unit and restarts a running one (reinstall); --no-block
        # because the health wait below is the one place that waits, with its own message.
        self._ctl("restart", "--no-block", UNIT_NAME)

    def uninstall(self) -> None:
        self._ctl("disable", "--now", UNIT_NAME, check=False)
        if not self.run.dry_run:
            self.path.unlink(missing_ok=True)
        self._ctl("daemon-reload")

    def failed(self) -> str | None:
        if self.run(["systemctl", "--user", "is-failed", "--quiet", UNIT_NAME], check=False) == 0:
            return f"{UNIT_NAME} failed to start; see: journalctl --user -u mlxd -n 50"
        return None

    def hints(self) -> list[str]:
        out = [f"  status:  systemctl --user status {UNIT_NAME}"]
        user = os.environ.get("USER", "")
        if user and not Path("/var/lib/systemd/linger", user).exists():
            out.append(
                "  note:    mlxd stops when you log out; to keep it running: "
                "loginctl enable-linger " + user
            )
        return out


# Health -------------------------------------------------------------------------------
def wait_for_health(
    url: str,
    timeout: float = HEALTH_TIMEOUT_SECONDS,
    *,
    interval: float = 0.5,
    failed: Callable[[], str | None] | None = None,
) -> dict[str, Any]:
    """GET ``url`` until it answers 200; return its JSON body. Raises AgentError on timeout.

    ``failed`` is asked between tries and returns a reason when waiting is pointless (the
    service manager already reports the start as failed).
    """
    opener = loopback_opener()
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while True:
        remaining = deadline - time.monotonic()
        try:
            with opener.open(url, timeout=max(0.1, min(5.0, remaining))) as resp:
                body = resp.read()
            try:
                data = json.loads(body)
            except ValueError:
                data = {}
            return data if isinstance(data, dict) else {}
        except urllib.error.HTTPError as exc:
            try:
                status = json.loads(exc.read()).get("status", "")
            except (ValueError, AttributeError, OSError):
                status = ""
            last = f"HTTP {exc.code} {status}".strip()
        except (urllib.error.URLError, OSError) as exc:
            last = str(getattr(exc, "reason", exc))
        reason = failed() if failed is not None else None
        if reason:
            raise AgentError(reason)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AgentError(
                f"mlxd did not answer {url} with 200 within {timeout:g} s (last: {last})"
            )
        time.sleep(min(interval, remaining))
