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

Modules: ``render`` (validate the config, fill in and check the service files),
``managers`` (launchd and systemd: write, load, stop; the health wait) and ``cli``.
"""

from .cli import install, main, uninstall
from .managers import Launchd, Runner, Systemd, wait_for_health
from .render import (
    LABEL,
    NOFILE_LIMIT,
    AgentError,
    ServiceSpec,
    build_spec,
    render_plist,
    render_unit,
    validate_plist,
)

__all__ = [
    "LABEL",
    "NOFILE_LIMIT",
    "AgentError",
    "Launchd",
    "Runner",
    "ServiceSpec",
    "Systemd",
    "build_spec",
    "install",
    "main",
    "render_plist",
    "render_unit",
    "uninstall",
    "validate_plist",
    "wait_for_health",
]
