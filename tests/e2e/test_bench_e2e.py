"""``bin/bench`` (``python -m mlxd.bench``) for real: output shape and process hygiene, never
timings."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_command
from mlxd.bench.harness import START_TIMEOUT, child_env
from mlxd.bench.results import INPROCESS, MLXD, REFERENCE

BENCH = [sys.executable, "-m", "mlxd.bench"]


@pytest.mark.timeout(420)
def test_quick_bench_against_both_servers(tmp_path: Path) -> None:
    """``--quick`` starts mlxd and mlx_lm.server, measures every suite on both and the
    in-process run, prints one JSON line per measurement, a ratio table, and an --out doc."""
    out = tmp_path / "bench.json"
    done = run_command([*BENCH, "--quick", "--out", str(out)], env=child_env(), timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(ln) for ln in done.stdout.splitlines()]
    assert all({"server", "metric", "value", "unit"} <= set(r) for r in lines)
    setups = {r["server"]: r["info"] for r in lines if r["metric"] == "setup"}
    assert set(setups) == {MLXD, REFERENCE, INPROCESS}
    assert setups[MLXD]["blas"] and setups[REFERENCE]["blas"]
    assert setups[REFERENCE]["weights"].startswith("quantized")

    measured = {(r["server"], r["metric"]) for r in lines if r["value"] is not None}
    per_server = {
        "ttft_ms",
        "decode_tokens_per_s",
        "prefill_tokens_per_s",
        "aggregate_tokens_per_s",
        "worst_ttft_ms",
        "turn_ttft_ms",
    }
    for server in (MLXD, REFERENCE):
        assert {(server, m) for m in per_server} <= measured
    assert {
        (INPROCESS, m) for m in ("ttft_ms", "decode_tokens_per_s", "prefill_tokens_per_s")
    } <= measured
    # The in-process reference ran in turn with the servers: mlxd / each, repeat by repeat.
    paired = {(r["metric"], r["versus"]) for r in lines if r["metric"].startswith("paired_")}
    assert paired == {
        (m, v)
        for m in ("paired_decode_ratio", "paired_prefill_ratio")
        for v in (REFERENCE, INPROCESS)
    }
    values = [r for r in lines if r["value"] is not None and r["metric"] != "setup"]
    assert all(r["min"] <= r["value"] <= r["max"] and r["value"] > 0 for r in values)
    assert {r["concurrency"] for r in values if r["metric"] == "aggregate_tokens_per_s"} == {1, 2}
    turns = {
        (r["server"], r.get("mode"), r["turn"])
        for r in lines
        if r["metric"] == "turn_ttft_ms" and r["value"] is not None
    }
    assert {(s, "chat", t) for s in (MLXD, REFERENCE) for t in (1, 2, 3)} <= turns
    responses = [r for r in lines if r.get("mode") == "responses"]
    # /v1/responses is mlxd-only: measured per turn, or one line saying why it was skipped.
    assert {r["server"] for r in responses} == {MLXD}
    assert len(responses) == 3 or responses[0]["skipped"]
    restart = {r.get("mode"): r for r in lines if r["metric"] == "restart_ttft_ms"}
    # mlxd only: the same prompt after a restart comes from the prompt cache's disk tier.
    assert set(restart) == {"cold", "after_restart"}
    assert {r["server"] for r in restart.values()} == {MLXD}
    assert restart["after_restart"]["cached_tokens"] >= 128

    assert "ratio = mlxd / other" in done.stderr
    doc = json.loads(out.read_text())
    assert set(doc) >= {"setup", "workload", "results", "ratios", "notes"}
    assert {r["versus"] for r in doc["ratios"]} == {REFERENCE, INPROCESS}
    assert len(doc["results"]) == len(lines) - len(setups)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
@pytest.mark.timeout(int(2 * START_TIMEOUT) + 120)
def test_sigterm_stops_the_servers(tmp_path: Path) -> None:
    """SIGTERM to the bench mid-run stops the server and the in-process worker it started;
    nothing is left behind."""
    err = tmp_path / "stderr.txt"
    with err.open("wb") as stderr:
        bench = subprocess.Popen(
            [*BENCH, "--quick", "--no-reference"],
            cwd=ROOT,
            env=child_env(),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        # mlxd and the worker each load the model (each within the harness's start bound).
        deadline = time.monotonic() + 2 * START_TIMEOUT
        while "single stream" not in err.read_text() and time.monotonic() < deadline:
            assert bench.poll() is None, err.read_text()[-2000:]
            time.sleep(0.2)
        children = _children(bench.pid)
        assert len(children) == 2, "the bench should have started mlxd and its worker"
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(60) != 0
        for pid in children:
            assert not Path(f"/proc/{pid}").exists() or "Z" in _state(pid)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait(10)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
    except (OSError, IndexError):
        return "gone"


def test_inprocess_worker_that_cannot_load_is_a_clear_error(tmp_path: Path) -> None:
    """The in-process reference's worker exits (a model that is not there): the bench gets a
    BenchError naming the worker and its log, not a hang."""
    from mlxd.bench.client import BenchError
    from mlxd.bench.inprocess import InProcess

    config = tmp_path / "mlxd.toml"
    config.write_text(f'[model]\npath = "{tmp_path / "no-such-model"}"\n')
    worker = InProcess(config, child_env(), tmp_path, warmups=1)
    try:
        with pytest.raises(BenchError, match="in-process worker exited"):
            worker.wait_ready(START_TIMEOUT)
    finally:
        worker.stop()
    assert worker.process.poll() is not None
