"""Which thread of a running mlxd holds the GIL, and how busy each thread is, while it streams.

    .venv/bin/python bin/gil_profile.py --model PATH [--streams 1] [--tokens 3000]
        [--py-spy PATH] [--out DIR]

Starts mlxd on the model (``[engine] max_batch_size = 32``), sends ``--streams`` concurrent
streamed Chat Completions of ``--tokens`` tokens each, and three seconds in, while every stream
is decoding, samples the daemon with py-spy for five seconds at 1 kHz twice: once with
``--gil`` (only the thread holding the GIL is sampled, so the counts per thread over 5,000 are
each thread's share of the GIL) and once with ``--idle`` (every thread, where it is). Over the
same windows it reads each thread's CPU time from ``/proc``. Linux only; py-spy needs to be
allowed to read the daemon's memory (same user, ptrace not restricted). Results:
``gil-summary-<streams>.json`` in ``--out`` (per mode: decode rate, samples per thread, the
top leaf frames per thread, CPU share per thread) plus py-spy's raw files. docs/engine.md
quotes the H200 runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "daemon"))

from mlxd.bench.client import StreamResult, stream_chat  # noqa: E402
from mlxd.bench.harness import Daemon  # noqa: E402

WINDOW_S = 5
RATE_HZ = 1000


def _cpu(pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of each thread of ``pid``, with its name."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(tid)] = (comm, (int(fields[11]) + int(fields[12])) / tick)
    return out


def _samples(raw: Path) -> tuple[dict[str, int], dict[str, list[tuple[str, int]]]]:
    """py-spy's raw output: samples per thread, and each thread's most sampled leaf frames."""
    counts: dict[str, int] = {}
    leaves: dict[str, dict[str, int]] = {}
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        frames = stack.split(";")
        counts[frames[0]] = counts.get(frames[0], 0) + int(n)
        per = leaves.setdefault(frames[0], {})
        per[frames[-1]] = per.get(frames[-1], 0) + int(n)
    top = {t: sorted(v.items(), key=lambda kv: -kv[1])[:8] for t, v in leaves.items()}
    return counts, top


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model path")
    p.add_argument("--streams", type=int, default=1)
    p.add_argument("--tokens", type=int, default=3000, help="max_tokens of each stream")
    p.add_argument("--py-spy", default="py-spy", help="the py-spy executable")
    p.add_argument("--out", default="gil-profile", help="folder for the results")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "daemon"
    tmp.mkdir(exist_ok=True)
    config = tmp / "mlxd.toml"
    config.write_text(f'[model]\npath = "{args.model}"\n[engine]\nmax_batch_size = 32\n')
    daemon = Daemon.start(config, state_dir=tmp / "state", log=out / "mlxd.log")
    summary: dict[str, Any] = {}
    try:
        daemon.wait_ready(900)
        pid = daemon.process.pid

        def ask(tag: str, n: int) -> StreamResult:
            text = f"[{tag}] Write a long essay about the sea."
            return stream_chat(daemon, [{"role": "user", "content": text}], n, 900)

        ask("warm", 50)
        for mode in ("gil", "idle"):
            results: dict[int, StreamResult] = {}

            def one(i: int, mode: str = mode, results: dict[int, StreamResult] = results) -> None:
                results[i] = ask(f"{mode} {i}", args.tokens)

            threads = [threading.Thread(target=one, args=(i,)) for i in range(args.streams)]
            for t in threads:
                t.start()
            time.sleep(3)
            raw = out / f"py-spy-{mode}-{args.streams}.txt"
            before, t0 = _cpu(pid), time.perf_counter()
            spy = subprocess.run(
                [
                    args.py_spy,
                    "record",
                    f"--{mode}",
                    "-p",
                    str(pid),
                    "-d",
                    str(WINDOW_S),
                    "-r",
                    str(RATE_HZ),
                    "--threads",
                    "-f",
                    "raw",
                    "-o",
                    str(raw),
                    "--nonblocking",
                ],
                capture_output=True,
                text=True,
            )
            after, t1 = _cpu(pid), time.perf_counter()
            for t in threads:
                t.join()
            counts, top = _samples(raw) if raw.exists() else ({}, {})
            summary[mode] = {
                "streams": args.streams,
                "decode_tok_s": round(sum(r.decode_tokens_per_s or 0 for r in results.values()), 1),
                "possible_samples": WINDOW_S * RATE_HZ,
                "samples_per_thread": counts,
                "top_leaves": top,
                "cpu_share_per_thread": {
                    f"{tid} {name}": round((cpu - before.get(tid, (name, 0.0))[1]) / (t1 - t0), 3)
                    for tid, (name, cpu) in after.items()
                    if cpu > before.get(tid, (name, 0.0))[1]
                },
                "py_spy_exit": spy.returncode,
                "py_spy_stderr": spy.stderr[-500:],
            }
            print(json.dumps(summary[mode]), flush=True)
    finally:
        daemon.stop()
    (out / f"gil-summary-{args.streams}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
