"""``python -m mlxd.agent install|uninstall`` (``bin/install-agent``, ``bin/uninstall-agent``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..config import DEFAULT_CONFIG_PATH, EX_CONFIG, ConfigError
from .managers import Launchd, Runner, Systemd, wait_for_health
from .render import HEALTH_TIMEOUT_SECONDS, AgentError, build_spec


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
