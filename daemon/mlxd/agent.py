"""Install mlxd as a per-user service: a launchd agent on macOS, a systemd user unit elsewhere.

    python -m mlxd.agent install   [--config PATH] [--platform launchd|systemd]
                                   [--dry-run] [--no-wait] [--timeout SECONDS]
    python -m mlxd.agent uninstall [--platform launchd|systemd] [--dry-run]

(``bin/install-agent`` and ``bin/uninstall-agent`` sync the environment and run these.)

Install, in order: validate the config exactly as the service will read it (no ``MLXD_*``
variables from this shell; exit 78 and write nothing when it is invalid), render the
template (``launchd/`` in a checkout, packaged with mlxd when installed), validate the
result, write it atomically, (re)load it with the service manager, wait for ``GET /health``
to answer 200, and print the endpoint, the config path and the log path. Reinstalling is
safe: the running service is stopped first, and the rendered file is the same for the same
inputs.

The service gets the daemon's shutdown budget (``server.shutdown_timeout_seconds``) plus
10 s before its manager kills it (launchd ``ExitTimeOut``, systemd ``TimeoutStopSec``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import plistlib
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape as xml_escape

from .config import CHECKOUT_ROOT, DEFAULT_CONFIG_PATH, EX_CONFIG, ConfigError, load_settings
from .resources import template_text

LABEL = "io.mlxd.daemon"
UNIT_NAME = "mlxd.service"
#: Seconds between launchd (re)starts; model loading takes a while, and this is also what
#: keeps a config that became invalid (exit 78) from spinning, since launchd has no
#: per-exit-status rule.
THROTTLE_SECONDS = 30
#: systemd: how long loading the model (READY=1) may take before the start counts as failed.
START_TIMEOUT_SECONDS = 300
#: Open files: each client connection, the log, SQLite and model shards need one.
NOFILE_LIMIT = 8192
#: Added to server.shutdown_timeout_seconds for the manager's stop timeout.
STOP_MARGIN_SECONDS = 10
HEALTH_TIMEOUT_SECONDS = 300.0
_PLACEHOLDER = re.compile(r"@[A-Z_]+@")
_REQUIRED_PLIST_KEYS = (
    "Label",
    "ProgramArguments",
    "RunAtLoad",
    "KeepAlive",
    "ThrottleInterval",
    "ProcessType",
    "ExitTimeOut",
    "WorkingDirectory",
    "EnvironmentVariables",
    "SoftResourceLimits",
    "HardResourceLimits",
    "StandardOutPath",
    "StandardErrorPath",
)


class AgentError(Exception):
    """Installing or removing the service failed; the message says what to do."""


@dataclass(frozen=True)
class ServiceSpec:
    """Everything the service files are rendered from."""

    root: Path  # the working directory: the checkout, or home for an installed mlxd
    python: Path
    config_path: Path
    stop_timeout: int
    health_url: str
    endpoint: str
    log_path: Path

    @property
    def argv(self) -> list[str]:
        return [str(self.python), "-m", "mlxd", "serve", "--config", str(self.config_path)]


@contextlib.contextmanager
def _without_mlxd_env() -> Iterator[list[str]]:
    """Hide this shell's MLXD_* variables: the service will not see them either."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("MLXD_")}
    for key in saved:
        del os.environ[key]
    try:
        yield sorted(saved)
    finally:
        os.environ.update(saved)


def build_spec(config_path: Path, root: Path | None = CHECKOUT_ROOT) -> ServiceSpec:
    """Validate the config as the service will read it. Raises ConfigError.

    From a checkout the service runs the checkout's ``.venv`` in the checkout; an installed
    mlxd runs with this Python, in the home directory.
    """
    with _without_mlxd_env() as hidden:
        settings = load_settings(config_path)
        settings.api_keys()  # an unreadable key file would make the service exit 78
    ignored = [k for k in hidden if k != "MLXD_CONFIG"]
    if ignored:
        print(
            f"mlxd: ignoring {', '.join(ignored)} from this shell: the service reads only "
            f"{config_path}",
            file=sys.stderr,
        )
    server = settings.server
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(server.host, server.host)
    netloc = f"[{host}]:{server.port}" if ":" in host else f"{host}:{server.port}"
    return ServiceSpec(
        root=root if root is not None else Path.home(),
        python=root / ".venv" / "bin" / "python" if root is not None else Path(sys.executable),
        config_path=config_path,
        stop_timeout=math.ceil(server.shutdown_timeout_seconds) + STOP_MARGIN_SECONDS,
        health_url=f"http://{netloc}/health",
        endpoint=f"http://{netloc}/v1",
        log_path=settings.log_path(),
    )


def _fill(template: str, values: dict[str, str]) -> str:
    out = _PLACEHOLDER.sub(lambda m: values.get(m.group(0)[1:-1], m.group(0)), template)
    left = sorted(set(_PLACEHOLDER.findall(out)))
    if left:
        raise AgentError(f"template placeholders without a value: {', '.join(left)}")
    return out


# launchd ------------------------------------------------------------------------------
def launchd_log_dir(home: Path) -> Path:
    return home / "Library" / "Logs" / "mlxd"


def render_plist(spec: ServiceSpec, home: Path) -> str:
    """The launch agent property list, from the template <label>.plist.in."""
    template = template_text(f"{LABEL}.plist.in")
    # launchd gives agents a bare PATH; add the environment and Homebrew's prefixes.
    system = "/opt/homebrew/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
    path = f"{spec.python.parent}:{system}"
    logs = launchd_log_dir(home)
    values = {
        "LABEL": LABEL,
        "PYTHON": str(spec.python),
        "CONFIG": str(spec.config_path),
        "ROOT": str(spec.root),
        "PATH": path,
        "THROTTLE": str(THROTTLE_SECONDS),
        "EXIT_TIMEOUT": str(spec.stop_timeout),
        "NOFILE": str(NOFILE_LIMIT),
        "STDOUT": str(logs / "launchd.stdout.log"),
        "STDERR": str(logs / "launchd.stderr.log"),
    }
    return _fill(template, {k: xml_escape(v) for k, v in values.items()})


def validate_plist(content: str) -> dict[str, Any]:
    """Parse the rendered plist back (plistlib round trip) and check the keys launchd needs."""
    try:
        data = plistlib.loads(content.encode("utf-8"))
    except Exception as exc:  # plistlib raises several unrelated types for bad XML
        raise AgentError(f"rendered plist does not parse: {exc}") from exc
    if not isinstance(data, dict):
        raise AgentError("rendered plist is not a dictionary")
    missing = [k for k in _REQUIRED_PLIST_KEYS if k not in data]
    if missing:
        raise AgentError(f"rendered plist lacks {', '.join(missing)}")
    if plistlib.loads(plistlib.dumps(data)) != data:
        raise AgentError("rendered plist does not survive a plistlib round trip")
    argv = data["ProgramArguments"]
    if not argv or not Path(argv[0]).is_absolute():
        raise AgentError("ProgramArguments[0] must be an absolute path")
    return data


# systemd ------------------------------------------------------------------------------
def systemd_unit_path(home: Path) -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(home / ".config")
    return Path(base) / "systemd" / "user" / UNIT_NAME


def _unit_quote(word: str, *, exec_line: bool) -> str:
    """Quote one word for a unit file: % starts a specifier, $ (ExecStart) a variable."""
    word = word.replace("%", "%%")
    if exec_line:
        word = word.replace("$", "$$")
    if re.search(r"[\s\"'\\;]", word) or not word:
        word = '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return word


def render_unit(spec: ServiceSpec) -> str:
    """The systemd user unit, from the template mlxd.service.in."""
    template = template_text("mlxd.service.in")
    path = f"{spec.python.parent}:/usr/local/bin:/usr/bin:/bin"
    values = {
        "EXEC_START": " ".join(_unit_quote(a, exec_line=True) for a in spec.argv),
        "ROOT": _unit_quote(str(spec.root), exec_line=False),
        "ENV_PATH": _unit_quote(f"PATH={path}", exec_line=False),
        "ENV_CONFIG": _unit_quote(f"MLXD_CONFIG={spec.config_path}", exec_line=False),
        "START_TIMEOUT": str(START_TIMEOUT_SECONDS),
        "STOP_TIMEOUT": str(spec.stop_timeout),
        "NOFILE": str(NOFILE_LIMIT),
    }
    return _fill(template, values)


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
    # No proxies: http_proxy in the environment must not capture a loopback request.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
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


# Command line -------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlxd.agent", description="Install or remove mlxd as a per-user service."
    )
    sub = parser.add_subparsers(dest="action", required=True)
    install = sub.add_parser("install", help="install (or reinstall) and start the service")
    uninstall = sub.add_parser("uninstall", help="stop and remove the service")
    for p in (install, uninstall):
        p.add_argument(
            "--platform",
            choices=["launchd", "systemd"],
            help="service manager (default: launchd on macOS, systemd elsewhere)",
        )
        p.add_argument(
            "--dry-run", action="store_true", help="print what would be done; change nothing"
        )
    install.add_argument("--config", help=f"config file (default: {DEFAULT_CONFIG_PATH})")
    install.add_argument("--no-wait", action="store_true", help="do not wait for /health")
    install.add_argument(
        "--timeout",
        type=float,
        default=HEALTH_TIMEOUT_SECONDS,
        help=f"seconds to wait for /health (default {HEALTH_TIMEOUT_SECONDS:g})",
    )
    return parser


def _manager(platform: str | None, dry_run: bool) -> Launchd | Systemd:
    platform = platform or ("launchd" if sys.platform == "darwin" else "systemd")
    run = Runner(dry_run)
    home = Path.home()
    return Launchd(home, run) if platform == "launchd" else Systemd(home, run)


def install(args: argparse.Namespace) -> int:
    config_path = Path(args.config).expanduser() if args.config else DEFAULT_CONFIG_PATH
    config_path = config_path.absolute()
    try:
        spec = build_spec(config_path)
    except ConfigError as exc:
        print(f"mlxd: {exc}\nmlxd: not installing the service.", file=sys.stderr)
        return EX_CONFIG
    manager = _manager(args.platform, args.dry_run)
    if not spec.python.exists() and not args.dry_run:
        raise AgentError(
            f"{spec.python} does not exist. Hint: run bin/install-agent, which creates it."
        )
    content = manager.render(spec)
    if args.dry_run:
        print(f"would write {manager.path}:\n{content}")
    manager.install(content, spec)
    if args.dry_run:
        return 0
    health: dict[str, Any] = {}
    if not args.no_wait:
        print(f"mlxd: waiting for {spec.health_url} (loading the model)...", file=sys.stderr)
        try:
            health = wait_for_health(spec.health_url, args.timeout, failed=manager.failed)
        except AgentError as exc:
            hints = "\n".join(manager.hints())
            raise AgentError(
                f"{exc}\nThe service is installed; find out why in {spec.log_path}\n{hints}"
            ) from None
    model = health.get("model")
    model_id = model.get("id") if isinstance(model, dict) else None
    state = f"running, serving {model_id}" if model_id else "installed"
    print(f"mlxd {state} ({manager.name}): {spec.endpoint}")
    print(f"  service: {manager.path}")
    print(f"  config:  {spec.config_path} (edits apply while it runs)")
    print(f"  log:     {spec.log_path} (read it with: bin/mlxd logs -f)")
    for line in manager.hints():
        print(line)
    return 0


def uninstall(args: argparse.Namespace) -> int:
    manager = _manager(args.platform, args.dry_run)
    existed = manager.path.exists()
    manager.uninstall()
    if not args.dry_run:
        print(
            f"mlxd service removed ({manager.name})"
            if existed
            else f"mlxd: no service file at {manager.path}; stopped it in case it was loaded"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return install(args) if args.action == "install" else uninstall(args)
    except AgentError as exc:
        print(f"mlxd: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
