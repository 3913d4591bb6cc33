"""The command line of ``bin/bench`` (``python -m mlxd.bench``): parse, start, measure, report."""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..config import BUNDLED_MODEL, CHECKOUT_ROOT, ConfigError, load_settings
from .harness import Daemon, HarnessError, Server, child_env, free_port, start_reference, wait_ready
from .inprocess import InProcess, inprocess_worker, record_inprocess_setup
from .results import MLXD, REFERENCE, Results, format_table
from .scenarios import SUITES, Bench
from .setupinfo import record_setup, reference_model
from .workload import Workload


def run(args: argparse.Namespace) -> int:
    work = Workload.from_args(args)
    results = Results()
    user_config = Path(args.mlxd_config).expanduser() if args.mlxd_config else None
    try:
        base = load_settings(user_config)
    except ConfigError as exc:
        print(f"bench: --mlxd-config: {exc}", file=sys.stderr)
        return 2
    model = args.model or (base.model.path if user_config else BUNDLED_MODEL)
    if Path(model).expanduser().exists():  # the servers run in the project root
        model = str(Path(model).expanduser().resolve())
    try:
        keys = base.api_keys()
    except ConfigError as exc:
        print(f"bench: --mlxd-config: {exc}", file=sys.stderr)
        return 2
    servers: list[Server] = []
    inprocess: InProcess | None = None
    tmp = Path(tempfile.mkdtemp(prefix="mlxd-bench-"))
    started = time.monotonic()
    try:
        config = tmp / "mlxd.toml"
        config.write_text(user_config.read_text() if user_config else "")
        mlxd_env = child_env({"MLXD_MODEL__PATH": model})
        auth = {"Authorization": f"Bearer {keys[0]}"} if keys else {}
        env = {"MLXD_MODEL__PATH": model, "MLXD_SERVER__HOST": "127.0.0.1"}
        command = None
        if args.ranks > 1:  # one model across a process group on this machine (ring)
            command = [sys.executable, "-m", "mlxd", "distributed", "--run", "-n", str(args.ranks)]
            env["MLXD_DISTRIBUTED__STARTING_PORT"] = str(free_port())
            if args.sharding:
                env["MLXD_DISTRIBUTED__SHARDING"] = args.sharding
        mlxd = Daemon.start(
            config,
            state_dir=tmp / "state",
            log=tmp / "mlxd.log",
            port=args.mlxd_port or None,
            env=env,
            command=command,
            cwd=CHECKOUT_ROOT,
            isolate=True,
            name=MLXD,
        )
        mlxd.headers = auth
        servers.append(mlxd)
        if args.reference:
            ref_model, how = reference_model(model, config, mlxd_env, tmp)
            ref = start_reference(
                ref_model,
                args.reference_port or free_port(),
                tmp / "reference.log",
                args.reference_arg,
                cwd=CHECKOUT_ROOT,
            )
            ref.name = REFERENCE
            ref.info["model_source"] = how
            servers.append(ref)
        reference_suites = [n for n in ("single", "prefill") if n not in args.skip]
        with_inprocess = "inprocess" not in args.skip and bool(reference_suites)
        if with_inprocess and not args.inprocess_after:  # loads beside the servers
            inprocess = InProcess(config, mlxd_env, tmp, work.warmups)
        wait_ready(servers, args.start_timeout)
        if inprocess is not None:
            inprocess.wait_ready(args.start_timeout)
            record_inprocess_setup(results, inprocess.info)
        bench = Bench(servers, work, results, args.request_timeout, inprocess)
        bench.warmup()
        record_setup(servers, results, model, work, args)
        for name, suite in SUITES.items():
            if name not in args.skip:
                suite(bench)
        for s in servers:
            s.stop()
        if with_inprocess and args.inprocess_after:
            bench.log("in-process mlx_lm.stream_generate (subprocess), after the servers")
            inprocess = InProcess(config, mlxd_env, tmp, work.warmups)
            inprocess.wait_ready(args.start_timeout)
            record_inprocess_setup(results, inprocess.info)
            alone = Bench([], work, results, args.request_timeout, inprocess)
            for name in reference_suites:
                SUITES[name](alone)
    except (HarnessError, OSError, http.client.HTTPException) as exc:
        print(f"bench: {type(exc).__name__}: {exc}", file=sys.stderr)
        if not args.keep_logs:
            print("bench: rerun with --keep-logs to keep the server logs", file=sys.stderr)
        return 1
    finally:
        for s in servers:
            s.stop()
        if inprocess is not None:
            inprocess.stop()
        if args.keep_logs:
            print(f"bench: logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    ratios = results.ratios()
    table = format_table(ratios)
    print(table, file=sys.stdout if args.table else sys.stderr, end="", flush=True)
    elapsed = round(time.monotonic() - started, 1)
    print(f"bench: done in {elapsed}s", file=sys.stderr)
    if args.out:
        doc = {
            "setup": results.setup,
            "workload": work.__dict__,
            "results": [r for r in results.records if r["metric"] != "setup"],
            "ratios": ratios,
            "notes": results.notes,
            "elapsed_s": elapsed,
        }
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench",
        description="Benchmark mlxd against mlx_lm.server (and in-process mlx-lm) on the same "
        "model and streaming workload. JSON lines on stdout, ratio table on stderr.",
    )
    p.add_argument(
        "--model",
        help=f"model path/spec for both sides (default: the --mlxd-config "
        f"model, else {BUNDLED_MODEL}); GGUF/bundled models are exported for the "
        "reference",
    )
    p.add_argument("--mlxd-config", help="config file for mlxd (default: an empty config)")
    p.add_argument(
        "--no-reference", dest="reference", action="store_false", help="do not start mlx_lm.server"
    )
    p.add_argument(
        "--reference-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for mlx_lm.server (repeatable; default: none)",
    )
    p.add_argument("--mlxd-port", type=int, default=0, help="port for mlxd (default: free)")
    p.add_argument(
        "--ranks",
        type=int,
        default=1,
        help="serve mlxd's model across this many ranks on this machine (mlxd distributed "
        "--run -n N, ring backend on loopback; default 1: one process)",
    )
    p.add_argument(
        "--sharding",
        choices=["pipeline", "tensor"],
        help="with --ranks: how the model is split (default: the config's, else pipeline)",
    )
    p.add_argument(
        "--reference-port", type=int, default=0, help="port for mlx_lm.server (default: free)"
    )
    p.add_argument("--repeats", type=int, help="repeats per measurement (default 3)")
    p.add_argument("--max-tokens", type=int, help="max_tokens of generation runs (default 200)")
    p.add_argument("--prefill-tokens", type=int, help="approximate prefill prompt size (1000)")
    p.add_argument(
        "--restart-tokens", type=int, help="prompt size of the restart suite (default 3000)"
    )
    p.add_argument("--concurrency", type=int, nargs="+", help="concurrency levels (1 4 8)")
    p.add_argument("--turns", type=int, help="conversation turns (default 10)")
    p.add_argument("--turn-max-tokens", type=int, help="max_tokens per turn (default 48)")
    p.add_argument(
        "--skip",
        nargs="+",
        default=[],
        choices=[*SUITES, "inprocess"],
        help="suites to leave out",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny run for smoke tests (1 repeat, short prompts, 3 turns, "
        "concurrency 1 and 2, few tokens)",
    )
    p.add_argument("--out", help="also write all results as one JSON document to this file")
    p.add_argument("--table", action="store_true", help="print the ratio table on stdout")
    p.add_argument(
        "--start-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for both servers to be ready",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=900.0,
        help="socket timeout of one request, seconds",
    )
    p.add_argument("--keep-logs", action="store_true", help="keep the temp dir with server logs")
    p.add_argument(
        "--inprocess-after",
        action="store_true",
        help="run the in-process reference after the servers have stopped instead of in turn "
        "with them (one copy of the model less in memory at a time; the comparison is then "
        "exposed to the machine's drift between the two)",
    )
    p.add_argument("--inprocess-worker", metavar="SPEC", help=argparse.SUPPRESS)
    return p


def _raise_on_term(signum: int, _frame: Any) -> None:
    # Turn SIGTERM/SIGHUP into an exception so `finally` stops the servers.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.inprocess_worker:
        return inprocess_worker(Path(args.inprocess_worker))
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_on_term)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("bench: interrupted; servers stopped", file=sys.stderr)
        return 130
