"""Where a burst's time to first token goes: N streams at once through a running mlxd.

    .venv/bin/python bin/burst_trace.py --model PATH [--streams 32] [--repeats 3]
        [--engine "prompt_cache_bytes = 0"] [--out FILE]

Starts mlxd on the model (``[engine] max_queue = 256, prefill_step_size = 2048`` plus the
``--engine`` lines), warms it with three short requests, then sends ``--streams`` streamed Chat
Completions at once (a barrier; the bench's prompts), ``--repeats`` times. Inside the daemon a
``sitecustomize`` (this script writes it to a temporary folder on ``PYTHONPATH``; it acts only
for ``python -m mlxd``) records a timeline: each request's prompt rendering and submission on
the event loop, each engine step (how many sequences, whether on the fast path), each
sequence's first token, and the time spent in the engine's admission (``runner.add``, the
prompt-cache lookup) and in mlx-lm's batch machinery (``PromptProcessingBatch.prompt`` /
``split`` / ``generate``, ``GenerationBatch.next``, the cache merge). Wall time on the engine
thread, without synchronizing: MLX's lazy work is counted where it is evaluated.

Prints, per burst, the client's first-token times and the daemon's steps until every stream
has its first token; ``--out`` writes the same as JSON. docs/engine.md quotes the H200 runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "daemon"))

from mlxd.bench.client import StreamResult, stream_chat  # noqa: E402
from mlxd.bench.harness import Daemon  # noqa: E402
from mlxd.bench.workload import LONG_PROMPTS, tagged  # noqa: E402

#: The daemon side: wraps engine and mlx-lm functions once they are imported, and writes the
#: timeline (perf_counter, thread, kind, ...) to BURST_TRACE_TIMELINE every second.
SITECUSTOMIZE = r"""
import json, os, sys, threading, time

if sys.orig_argv[1:3] == ["-m", "mlxd"] and os.environ.get("BURST_TRACE_TIMELINE"):
    EV = []
    PATH = os.environ["BURST_TRACE_TIMELINE"]

    def rec(*a):
        EV.append((time.perf_counter(), threading.current_thread().name) + a)

    def wrap(owner, attr, label):
        orig = getattr(owner, attr)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                d = time.perf_counter() - t
                EV.append((t, threading.current_thread().name, "dur", label, d))

        setattr(owner, attr, timed)

    def patch():
        P = sys.modules["mlxd.api.pipeline"]
        C = sys.modules["mlxd.engine.core"]
        B = sys.modules["mlxd.engine.batch"]
        import mlx_lm.generate  # noqa: F401
        import mlxd.engine.promptcache as PC

        G = sys.modules["mlx_lm.generate"]
        render = P.render

        async def timed_render(*a, **k):
            rec("render0")
            r = await render(*a, **k)
            rec("render1")
            return r

        P.render = timed_render
        submit = C.Engine.submit

        def timed_submit(self, req):
            h = submit(self, req)
            rec("submit")
            return h

        C.Engine.submit = timed_submit
        step = B.BatchRunner.step

        def timed_step(self, *a, **k):
            rec("step0", len(self.active), self._solo is not None)
            r = step(self, *a, **k)
            rec("step1", len(self.active))
            return r

        B.BatchRunner.step = timed_step
        text = B.BatchRunner._text

        def first(self, job, token, logprobs=None):
            if job.completion_tokens == 0:
                rec("first", job.id)
            return text(self, job, token, logprobs)

        B.BatchRunner._text = first
        wrap(B.BatchRunner, "add", "runner.add")
        wrap(B.BatchRunner, "_join_solo", "join_solo")
        wrap(PC.PromptCache, "lookup", "cache.lookup")
        wrap(G, "_merge_caches", "merge_caches")
        wrap(G.PromptProcessingBatch, "prompt", "prompt_batch.prompt")
        wrap(G.PromptProcessingBatch, "split", "prompt_batch.split")
        wrap(G.PromptProcessingBatch, "generate", "prompt_batch.generate")
        wrap(G.GenerationBatch, "next", "generation_batch.next")
        rec("patched")

    def waiter():
        names = ("mlxd.api.pipeline", "mlxd.engine.core", "mlxd.engine.batch")
        while True:
            time.sleep(0.01)
            mods = [sys.modules.get(n) for n in names]
            if all(mods) and all(
                hasattr(m, a) for m, a in zip(mods, ("start_choices", "Engine", "BatchRunner"))
            ):
                time.sleep(0.2)  # let the imports finish
                patch()
                return

    def writer():
        while True:
            time.sleep(1)
            with open(PATH + ".tmp", "w") as f:
                json.dump(EV, f)
            os.replace(PATH + ".tmp", PATH)

    threading.Thread(target=waiter, daemon=True).start()
    threading.Thread(target=writer, daemon=True).start()
"""


def burst(d: Daemon, n: int, tag: str, tokens: int) -> list[StreamResult]:
    out: list[Any] = [None] * n
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        text = tagged(f"{tag}.{i}", LONG_PROMPTS[i % len(LONG_PROMPTS)])
        barrier.wait(60)
        out[i] = stream_chat(d, [{"role": "user", "content": text}], tokens, 600)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any(r is None for r in out):
        raise SystemExit("a stream failed")
    return out


def timeline(events: list[list[Any]], start: float, n: int) -> dict[str, Any]:
    """The daemon's side of one burst (``start``: its first render, perf_counter)."""
    evs = [e for e in events if start - 0.001 <= e[0] <= start + 5]

    def ms(t: float) -> float:
        return round((t - start) * 1000, 1)

    steps: list[dict[str, Any]] = []
    firsts = 0
    opened: list[Any] | None = None
    for e in evs:
        if e[2] == "step0":
            opened = e
        elif e[2] == "step1" and opened is not None:
            inside = [x for x in evs if opened[0] <= x[0] <= e[0]]
            got = sum(1 for x in inside if x[2] == "first")
            spent: dict[str, float] = {}
            for x in inside:
                if x[2] == "dur":
                    spent[x[3]] = spent.get(x[3], 0.0) + x[4] * 1000
            steps.append(
                {
                    "from_ms": ms(opened[0]),
                    "to_ms": ms(e[0]),
                    "sequences": opened[3],
                    "fast_path": opened[4],
                    "first_tokens": got,
                    "spent_ms": {k: round(v, 1) for k, v in spent.items() if v >= 0.1},
                }
            )
            firsts += got
            opened = None
            if firsts >= n:
                break
    renders = [ms(e[0]) for e in evs if e[2] == "render0"]
    submits = [ms(e[0]) for e in evs if e[2] == "submit"]
    admission = {}
    for x in evs:
        if x[2] == "dur" and x[3] in ("runner.add", "cache.lookup") and x[0] <= evs[-1][0]:
            admission[x[3]] = round(admission.get(x[3], 0.0) + x[4] * 1000, 1)
    return {
        "renders_ms": [renders[0], renders[-1]] if renders else None,
        "submits_ms": [submits[0], submits[-1]] if submits else None,
        "admission_ms": admission,
        "steps": [s for s in steps if not s["fast_path"] or s["first_tokens"]],
        "fast_path_steps": sum(1 for s in steps if s["fast_path"]),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokens", type=int, default=40, help="tokens per stream")
    p.add_argument("--engine", action="append", default=[], help="an extra [engine] line")
    p.add_argument("--out")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="mlxd-burst-") as tmp_name:
        tmp = Path(tmp_name)
        site = tmp / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        events_path = tmp / "timeline.json"
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(site), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        os.environ["BURST_TRACE_TIMELINE"] = str(events_path)
        cfg = tmp / "mlxd.toml"
        engine = "\n".join(["max_queue = 256", "prefill_step_size = 2048", *args.engine])
        cfg.write_text(f'[model]\npath = "{args.model}"\n[engine]\n{engine}\n')
        d = Daemon.start(cfg, state_dir=tmp / "state", log=tmp / "mlxd.log", name="mlxd")
        try:
            d.wait_ready(900)
            for w in range(3):
                stream_chat(d, [{"role": "user", "content": f"warm {w}"}], 20, 600)
            clients = []
            for rep in range(args.repeats):
                rs = burst(d, args.streams, f"b{rep}", args.tokens)
                t0 = min(r.started_at for r in rs)
                clients.append(
                    {
                        "sends_spread_ms": round((max(r.started_at for r in rs) - t0) * 1000, 1),
                        "first_tokens_ms": sorted(
                            round((r.started_at - t0 + r.ttft) * 1000, 1) for r in rs
                        ),
                    }
                )
                time.sleep(1.5)
            time.sleep(1.5)  # the daemon writes its timeline every second
            events = json.loads(events_path.read_text())
        finally:
            d.stop()
    renders = [e for e in events if e[2] == "render0"]
    starts = [e[0] for k, e in enumerate(renders) if k == 0 or e[0] - renders[k - 1][0] > 1.0]
    bursts = []
    for client, start in zip(clients, starts[-args.repeats :], strict=True):
        server = timeline(events, start, args.streams)
        bursts.append({"client": client, "daemon": server})
        firsts = client["first_tokens_ms"]
        print(
            f"burst: sends spread {client['sends_spread_ms']} ms, first tokens "
            f"{firsts[0]}..{firsts[-1]} ms (median {firsts[len(firsts) // 2]}); "
            f"rendered {server['renders_ms']}, submitted {server['submits_ms']}, "
            f"{server['fast_path_steps']} fast-path steps"
        )
        for s in server["steps"]:
            spent = " ".join(f"{k}={v}" for k, v in sorted(s["spent_ms"].items()))
            print(
                f"  step {s['from_ms']}-{s['to_ms']} ms, {s['sequences']} sequences"
                f"{' (fast path)' if s['fast_path'] else ''}, +{s['first_tokens']} first: " + spent
            )
    result = {"streams": args.streams, "engine": args.engine, "bursts": bursts}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
