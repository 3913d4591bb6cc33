"""``mlxd`` command line: serve (default), check-config, export-model, logs, ps.

Exit status 78 (EX_CONFIG) means the configuration is unusable; service files treat it as
final, so a bad config does not make launchd/systemd restart the daemon in a loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from .config import EX_CONFIG, ConfigError, Settings, config_path_from, load_settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlxd", description="Local OpenAI-compatible inference daemon for MLX models."
    )
    parser.add_argument("--config", help="config file (default: $MLXD_CONFIG or etc/mlxd.toml)")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="run the daemon in the foreground (the default)")
    check = sub.add_parser("check-config", help="validate the config and print it")
    check.add_argument(
        "--render-toml", action="store_true", help="print the documented default config"
    )
    check.add_argument(
        "--render-markdown", action="store_true", help="print the README config table"
    )
    export = sub.add_parser("export-model", help="write the configured model as an MLX directory")
    export.add_argument("out", help="output directory")
    export.add_argument(
        "--dtype", choices=["keep", "float32", "float16", "bfloat16"], default="keep"
    )
    logs = sub.add_parser("logs", help="show the structured log for a person")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument("--json", action="store_true", help="print raw JSON lines")
    logs.add_argument("--level", help="lowest level to show (debug, info, warning, error)")
    logs.add_argument("--request-id", help="only lines of this request id")
    logs.add_argument("--event", help="only events starting with this name (e.g. request.)")
    logs.add_argument("-n", "--lines", type=int, default=50, help="lines of history (default 50)")
    dist = sub.add_parser(
        "distributed",
        help="print (or --run) the mlx.launch line that serves one model across machines",
    )
    dist.add_argument("--config", dest="sub_config", help="config file ([distributed] hosts)")
    dist.add_argument("--run", action="store_true", help="run it instead of printing it")
    dist.add_argument("-n", type=int, default=0, help="ranks on this machine (no hosts set)")
    ps = sub.add_parser("ps", help="list the daemon's models: state, memory, idle time")
    ps.add_argument("--json", action="store_true", help="print the /health models as JSON")
    for p in (check, export, logs, ps, sub.choices["serve"]):
        p.add_argument("--config", help=argparse.SUPPRESS, dest="sub_config")
    return parser


def _settings(path_arg: str | None) -> tuple[Settings, Path | None]:
    path = config_path_from(path_arg)
    return load_settings(path), path


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config_arg = getattr(args, "sub_config", None) or args.config
    command = args.command or "serve"
    if command == "check-config" and (args.render_toml or args.render_markdown):
        from .config import render_markdown, render_toml

        sys.stdout.write(render_toml() if args.render_toml else render_markdown())
        return 0
    try:
        settings, path = _settings(config_arg)
        if command == "serve":
            settings.api_keys()  # an unreadable key file is a config error, found now
    except ConfigError as exc:
        print(f"mlxd: {exc}", file=sys.stderr)
        return EX_CONFIG
    # The BLAS must be chosen before anything imports mlx (see mlxd.backend).
    from .backend import apply_cuda_env_defaults, preload_blas, set_kernel_cache

    preload_blas(settings.engine.blas)
    set_kernel_cache(settings.state_dir())  # before mlx import, like the BLAS
    apply_cuda_env_defaults()
    if command == "ps":
        from .ps import run as run_ps

        return run_ps(settings, as_json=args.json)
    if command in ("serve", "check-config"):
        problem = _budget_problem(settings)
        if problem is not None:
            print(f"mlxd: invalid configuration: {problem}", file=sys.stderr)
            return EX_CONFIG
    if command == "check-config":
        return _check_config(settings, path)
    if command == "export-model":
        return _export_model(settings, Path(args.out), args.dtype)
    if command == "distributed":
        from .launch import run as run_launch

        return run_launch(lambda: _settings(config_arg), run=args.run, local_ranks=args.n)
    if command == "serve" and _heads_group(settings):
        from .launch import NOT_A_GROUP, supervise

        code = supervise(lambda: _settings(config_arg), keep=_heads_group)
        if code == NOT_A_GROUP:  # [distributed] hosts were removed: one process again
            _restart(list(sys.argv[1:] if argv is None else argv))
            return 1
        return code
    if command == "logs":
        from .logview import run as run_logs

        return int(run_logs(settings, args))
    return _serve(settings, path, list(sys.argv[1:] if argv is None else argv))


def _budget_problem(settings: Settings) -> str | None:
    """Pinned models that cannot fit the memory budget (needs the backend, so not in config)."""
    from .backend import device_info
    from .models.memory import pinned_problem

    info = device_info()
    return pinned_problem(settings, info["device"], info["backend"])


def _memory_plan(settings: Settings) -> dict[str, object]:
    """The budget and each model's estimate, as check-config prints them."""
    from .backend import device_info
    from .models.memory import budget, plan
    from .models.registry import model_table

    info = device_info()
    limit = budget(settings, info["device"], info["backend"])
    planned = plan(
        model_table(settings),
        settings.engine.max_batch_size,
        info["device"],
        info["backend"],
        limit,
    )
    models = {
        entry_id: None
        if est is None
        else {
            "weights_bytes": est.weights_bytes,
            "kv_bytes": est.kv_bytes,
            "total": est.total,
            "max_batch_size": est.slots,
        }
        for entry_id, est in planned.items()
    }
    return {"budget_bytes": limit, "models": models}


def _check_config(settings: Settings, path: Path | None) -> int:
    from .backend import blas_choice, device_info
    from .config import effective_config

    out = {
        "config_file": str(path) if path else None,
        "settings": effective_config(settings),
        "paths": {
            "state_dir": str(settings.state_dir()),
            "database": str(settings.database_path()),
            "archive_dir": str(settings.archive_path()),
            "log_file": str(settings.log_path()),
        },
        "backend": {**device_info(), "blas_reason": blas_choice().reason},
        "memory": _memory_plan(settings),
    }
    print(json.dumps(out, indent=2))
    print("configuration OK", file=sys.stderr)
    return 0


def _export_model(settings: Settings, out: Path, dtype: str) -> int:
    import mlx.core as mx

    from .errors import ModelLoadError
    from .models.source import resolve

    try:
        from .models.registry import Router

        source = resolve(Router.from_settings(settings).resolve(None).path)
        if source.kind not in ("bundled", "gguf"):
            print(f"mlxd: {source.path} is already an MLX/HF directory", file=sys.stderr)
            return 1
        from .models.gguf import export_mlx_dir

        target = None if dtype == "keep" else getattr(mx, dtype)
        export_mlx_dir(source.path, out, dequantize=target)
    except ModelLoadError as exc:
        print(f"mlxd: {exc}", file=sys.stderr)
        return 1
    print(str(out))
    return 0


def _serve(settings: Settings, path: Path | None, argv: list[str]) -> int:
    from .fdlimit import import_mlx_lm_keeping_limit
    from .filemodes import restrict_new_files, secure_state
    from .logs import get_logger, setup_logging

    import_mlx_lm_keeping_limit()  # before anything imports it (see mlxd.fdlimit)
    from .service import Service

    restrict_new_files()  # conversations and logs are the user's alone (before any file opens)
    group, problem = _join_group(settings)
    if problem is not None:
        print(f"mlxd: {problem}", file=sys.stderr)
        return EX_CONFIG
    log_path = settings.log_path()
    if group is not None and group.rank:  # one log file per rank
        log_path = log_path.with_name(f"{log_path.stem}.rank{group.rank}{log_path.suffix}")
    try:
        setup_logging(settings.logging, log_path)
    except OSError as exc:
        print(f"mlxd: cannot open log file {log_path}: {exc}", file=sys.stderr)
        return EX_CONFIG
    if group is not None and group.rank:
        from .engine.follower import follow

        return follow(group, settings.engine)
    secure_state(settings, path)
    service = Service(settings, path, group)
    try:
        code = asyncio.run(service.run())
    except KeyboardInterrupt:
        return 0
    except Exception as exc:
        get_logger("mlxd").exception("server.crashed", error=str(exc))
        return 1
    if code == 0 and service.restart_requested:
        if group is not None:  # the followers stopped with rank 0; the group starts anew
            print("mlxd: restart the group to apply the change (exit 75)", file=sys.stderr)
            return 75
        _restart(argv)  # returns only if exec failed
        return 1
    return code


def _heads_group(settings: Settings) -> bool:
    """``mlxd serve`` on the first machine of a configured group, not started by mlx.launch:
    it starts the group and keeps it running (see :func:`mlxd.launch.supervise`)."""
    from .engine.distributed import launched

    d = settings.distributed
    return bool(d.hosts or d.hostfile) and not launched()


def _join_group(settings: Settings) -> tuple[Any, str | None]:
    """This process's group when ``mlx.launch`` started it, after checking the config can be
    served that way (one model)."""
    from .engine.distributed import Group, launched
    from .models.registry import Router

    if not launched():
        return None, None
    entries = Router.from_settings(settings).entries
    if len(entries) > 1:
        return None, (
            f"a model split across ranks is served alone; the config has {len(entries)} "
            f"models ({', '.join(entries)}). Keep one [models.<id>] entry (or [model])"
        )
    d = settings.distributed
    try:
        return Group.join(d.backend, d.sharding, d.step_timeout), None
    except (RuntimeError, ValueError) as exc:
        return None, f"cannot join the process group ({d.backend}): {exc}"


def _restart(argv: list[str]) -> None:
    """Replace this process with a fresh ``mlxd`` (config reload changed host/port): the PID
    stays, so launchd/systemd never see an exit, and the new process reads the config anew."""
    import logging
    import os

    from .logs import get_logger

    command = [sys.executable, "-m", "mlxd", *argv]
    get_logger("mlxd").info("server.restarting", argv=command[1:])
    logging.shutdown()  # flush and close the log file before the image is replaced
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, command)
    except OSError as exc:
        print(f"mlxd: restart failed: {exc}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
