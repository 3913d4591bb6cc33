"""Where a long prompt's time to first token goes through the server (docs/engine.md).

    .venv/bin/python bin/prefill_trace.py [--config CFG] [--model PATH] [--tokens 4000]
        [--repeats 3] [--out trace.json]

Starts mlxd (``python bin/prefill_trace.py serve TRACE -- mlxd args``: the daemon itself,
with timers wrapped around the functions a request passes through), sends the same
``bench`` prefill request (a ~``--tokens``-token document, ``max_tokens = 1``, streamed) a
few times after warming up at the same length, and prints for each where the time between
the client's send and its first text went. Every timestamp is ``time.perf_counter()``
(CLOCK_MONOTONIC on Linux, so the client's and the daemon's line up). After each server
request, the same prompt ids go through in-process ``mlx_lm.stream_generate`` with the same
chunk size, warm, in this process (so load hits both alike); ``--no-server`` runs only that
reference (e.g. under ``MLX_CUDA_USE_CUDNN_SDPA=1``, MLX's default, which mlxd turns off).

Parts (milliseconds, per request):

* ``http_in``: send to the route's prompt rendering (HTTP, body parsing, validation, routing);
* ``render``: chat template and tokenizing (``pipeline.render``, on a worker thread);
* ``to_engine``: render's end to ``BatchRunner.add`` on the engine thread (submit, inbox);
* ``lookup``: the prompt-cache lookup (RAM, then the disk tier's index);
* ``prefill``: the prompt's chunks (``SoloSequence.prefill_chunk``, each evaluated);
* ``first_token``: the forward of the last prompt token and the first ``.item()``;
* ``store``: keeping the finished sequence's KV cache (RAM copy, disk tier hand-off);
* ``to_client``: from the engine's hand-off of the text event to the client's first text
  (event loop hop, SSE frame, HTTP).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: MLXD_TRACE_DAEMON: another checkout's daemon/ folder, to trace an older engine the same way.
sys.path.insert(0, os.environ.get("MLXD_TRACE_DAEMON") or str(ROOT / "daemon"))

_TRACE: Any = None


def _mark(name: str, t0: float, t1: float, **extra: Any) -> None:
    _TRACE.write(json.dumps({"name": name, "t0": t0, "t1": t1, **extra}) + "\n")


def _timed(owner: Any, attr: str, name: str, size: Any = None) -> None:
    fn = getattr(owner, attr)
    if asyncio.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def awrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                _mark(name, t0, time.perf_counter())

        setattr(owner, attr, awrapper)
        return

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        extra = size(*args) if size is not None else {}
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _mark(name, t0, time.perf_counter(), **extra)

    setattr(owner, attr, wrapper)


def serve(trace: Path, argv: list[str]) -> int:
    """mlxd's own main, with timers around the request path."""
    global _TRACE
    _TRACE = trace.open("a", buffering=1)
    from mlxd.backend import apply_cuda_env_defaults, preload_blas, set_kernel_cache
    from mlxd.config import load_settings

    config = argv[argv.index("--config") + 1] if "--config" in argv else None
    settings = load_settings(Path(config) if config else None)
    preload_blas(settings.engine.blas)  # as mlxd's main does, before anything imports mlx
    set_kernel_cache(settings.state_dir())
    apply_cuda_env_defaults()
    from mlxd import cli
    from mlxd.api import pipeline
    from mlxd.engine import batch, core, diskcache, promptcache, solo

    _timed(pipeline, "render", "render")
    _timed(batch.BatchRunner, "add", "add")
    _timed(promptcache.PromptCache, "lookup", "lookup")
    _timed(promptcache.PromptCache, "store", "store")
    _timed(diskcache.DiskCache, "put", "disk_put")
    _timed(
        solo.SoloSequence,
        "prefill_chunk",
        "chunk",
        lambda s: {"n": min(s.prefill_step_size, len(s.remaining) - 1)},
    )
    _timed(solo.SoloSequence, "decode", "decode")
    _timed(core, "_dispatch", "dispatch")
    if hasattr(core, "_deliver"):
        _timed(core, "_deliver", "deliver")
    else:  # before the store moved: the flush delivered
        _timed(core.Engine, "_flush", "deliver")
    return cli.main(argv)


def _parts(send: float, first: float, marks: list[dict[str, Any]]) -> dict[str, float]:
    """The request's parts (ms) from the daemon's marks between ``send`` and ``first``."""
    mine = [m for m in marks if send <= m["t0"] <= first]

    def one(name: str) -> dict[str, Any]:
        found = [m for m in mine if m["name"] == name]
        return found[0] if found else {"t0": float("nan"), "t1": float("nan")}

    render, add = one("render"), one("add")
    chunks = [m for m in mine if m["name"] == "chunk"]
    prefill = [c for c in chunks if c.get("n", 0) > 0]
    last = [c for c in chunks if c.get("n", 0) <= 0]
    # A store that ends after the client's first text was not on its way (it runs after
    # the text is delivered since the store was moved); only the ones before count.
    stores = [m for m in mine if m["name"] == "store" and m["t1"] <= first]
    delivered = [m for m in mine if m["name"] == "deliver" and m["t1"] <= first]
    gaps = 0.0  # engine time between chunks (the loop: inbox, admit, status)
    for a, b in itertools.pairwise(chunks):
        gaps += b["t0"] - a["t1"]
    ms = 1000.0
    out = {
        "http_in": (render["t0"] - send) * ms,
        "render": (render["t1"] - render["t0"]) * ms,
        "to_engine": (add["t0"] - render["t1"]) * ms,
        "lookup": sum((m["t1"] - m["t0"]) * ms for m in mine if m["name"] == "lookup"),
        "add_other": (add["t1"] - add["t0"]) * ms
        - sum((m["t1"] - m["t0"]) * ms for m in mine if m["name"] == "lookup"),
        "add_to_prefill": ((chunks[0]["t0"] if chunks else add["t1"]) - add["t1"]) * ms,
        "prefill": sum((c["t1"] - c["t0"]) * ms for c in prefill),
        "prefill_chunks": len(prefill),
        "between_chunks": gaps * ms,
        "first_token": sum((c["t1"] - c["t0"]) * ms for c in last)
        + sum((m["t1"] - m["t0"]) * ms for m in mine if m["name"] == "decode"),
        "store": sum((m["t1"] - m["t0"]) * ms for m in stores),
        "to_client": (first - delivered[-1]["t1"]) * ms if delivered else float("nan"),
        "total": (first - send) * ms,
    }
    return {k: round(v, 2) for k, v in out.items()}


class _Reference:
    """In-process ``mlx_lm.stream_generate`` in this process: the model loaded as mlxd loads
    it, the same prompt ids (mlxd's template), the same chunk size; TTFT of one request."""

    def __init__(self, config: Path | None, model: str | None) -> None:
        from mlxd.backend import apply_cuda_env_defaults, preload_blas
        from mlxd.config import load_settings

        settings = load_settings(config)
        if model:
            entry = settings.model.model_copy(update={"path": model})
            settings = settings.model_copy(update={"model": entry})
        apply_cuda_env_defaults()  # an MLX_CUDA_USE_CUDNN_SDPA already set wins
        self.blas = preload_blas(settings.engine.blas).library
        from mlxd.engine.loader import load

        self.lm = load(settings.model)
        self.step = settings.engine.prefill_step_size

    def ttft(self, messages: list[Any]) -> dict[str, float]:
        from mlx_lm import stream_generate

        from mlxd.prompt import build_prompt

        t0 = time.perf_counter()
        ids = build_prompt(self.lm, messages).ids
        t1 = time.perf_counter()
        for _ in stream_generate(
            self.lm.model, self.lm.tokenizer, ids, max_tokens=1, prefill_step_size=self.step
        ):
            break
        t2 = time.perf_counter()
        return {
            "render": round((t1 - t0) * 1000, 2),
            "total": round((t2 - t1) * 1000, 2),
            "prompt_tokens": len(ids),
            "tok_s": round(len(ids) / (t2 - t1), 1),
        }

    def info(self) -> dict[str, Any]:
        return {
            "blas": self.blas,
            "prefill_step_size": self.step,
            "MLX_CUDA_USE_CUDNN_SDPA": os.environ.get("MLX_CUDA_USE_CUDNN_SDPA"),
        }


def _median(rows: list[dict[str, Any]]) -> dict[str, float]:
    keys = [k for k in rows[0] if type(rows[0][k]) in (int, float)]
    return {k: round(statistics.median(r[k] for r in rows), 2) for k in keys}


def run(args: argparse.Namespace) -> int:
    """Server and in-process requests alternate, repeat by repeat, so load hits both alike."""
    from mlxd.bench.client import stream_chat
    from mlxd.bench.harness import Daemon
    from mlxd.bench.workload import prefill_text, tagged

    doc = prefill_text(args.tokens)
    warm = [[{"role": "user", "content": tagged(f"warm {i}", doc)}] for i in range(args.warm)]
    reqs = [
        [
            {
                "role": "user",
                "content": tagged(f"prefill {r}", prefill_text(args.tokens + r * args.vary)),
            }
        ]
        for r in range(args.repeats)
    ]
    config_arg = Path(args.config) if args.config else None
    ref = None if args.no_inprocess else _Reference(config_arg, args.model)
    out: dict[str, Any] = {"load_before": os.getloadavg()}
    refs: list[dict[str, Any]] = []
    if args.no_server:
        assert ref is not None
        for msg in warm:
            ref.ttft(msg)
        refs = [ref.ttft(msg) for msg in reqs]
    else:
        tmp = Path(tempfile.mkdtemp(prefix="mlxd-trace-"))
        trace = tmp / "trace.jsonl"
        config = config_arg or tmp / "mlxd.toml"
        if config_arg is None:
            config.write_text("")
        env = {"MLXD_SERVER__HOST": "127.0.0.1"}
        if args.daemon:
            env["MLXD_TRACE_DAEMON"] = str(Path(args.daemon).resolve())
        if args.model:
            env["MLXD_MODEL__PATH"] = args.model
        cmd = [sys.executable, str(Path(__file__).resolve()), "serve", str(trace), "--"]
        daemon = Daemon.start(
            config, state_dir=tmp / "state", log=tmp / "mlxd.log", env=env, command=cmd, cwd=ROOT
        )
        rows = []
        try:
            daemon.wait_ready(args.timeout)
            for msg in [[{"role": "user", "content": "[warmup] Say hello."}], *warm]:
                stream_chat(daemon, msg, 1, args.timeout)
                if ref is not None:
                    ref.ttft(msg)
            for i, msg in enumerate(reqs):
                # After a pause (the disk tier's writer finishes the previous entry), the
                # first of the two meets an idle GPU: odd repeats run the reference first.
                time.sleep(0.5)
                if ref is not None and i % 2:
                    refs.append({**ref.ttft(msg), "first": True})
                    print("inprocess", json.dumps(refs[-1]), flush=True)
                r = stream_chat(daemon, msg, 1, args.timeout)
                time.sleep(0.2)
                marks = [json.loads(line) for line in trace.read_text().splitlines()]
                row = _parts(r.started_at, r.started_at + r.ttft, marks)
                row["prompt_tokens"] = r.prompt_tokens
                row["cached_tokens"] = r.cached_tokens or 0
                row["tok_s"] = round(r.prompt_tokens / r.ttft, 1)
                row["first"] = ref is None or i % 2 == 0
                rows.append(row)
                print("server", json.dumps(row), flush=True)
                if ref is not None and i % 2 == 0:
                    refs.append({**ref.ttft(msg), "first": False})
                    print("inprocess", json.dumps(refs[-1]), flush=True)
        finally:
            daemon.stop(timeout=30)
        out["server"] = rows
        out["server_median"] = _median(rows)
    if ref is not None:
        out["inprocess"] = {**ref.info(), "runs": refs, "median": _median(refs)}
    out["load_after"] = os.getloadavg()
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "serve":
        rest = sys.argv[3:]
        return serve(Path(sys.argv[2]), rest[1:] if rest[:1] == ["--"] else rest)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", help="mlxd config (default: an empty one, mlxd's defaults)")
    p.add_argument("--model", help="model path (default: the bundled model)")
    p.add_argument("--tokens", type=int, default=4000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warm", type=int, default=1, help="warm-up requests at the same length")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument(
        "--vary", type=int, default=0, help="request r asks for --tokens + r * VARY tokens"
    )
    p.add_argument("--no-inprocess", action="store_true")
    p.add_argument("--no-server", action="store_true", help="only the in-process reference")
    p.add_argument("--daemon", help="trace the mlxd package of this daemon/ folder instead")
    p.add_argument("--out")
    return run(p.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
