"""The service files: the config validated as the service will read it, the templates
filled in, quoted for systemd and escaped for launchd, and the result checked."""

from __future__ import annotations

import contextlib
import math
import os
import plistlib
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape as xml_escape

from ..config import CHECKOUT_ROOT, load_settings
from ..resources import template_text

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
