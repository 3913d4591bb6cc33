"""The in-process reference: ``mlx_lm.stream_generate`` with mlxd's BLAS and model loading,
in a worker subprocess, to show how much the HTTP server costs.

The worker (``python -m mlxd.bench --inprocess-worker SPEC``) loads the model once, then
answers one generation per request line on its stdin with one JSON line on its stdout, so
the suites ask it repeat by repeat between the servers (:class:`InProcess`): a machine whose
speed drifts during the run (a GPU host's clocks, other work) then moves every side alike.
It is the only place the bench imports mlx, after choosing the BLAS, so the choice never
leaks into the bench process.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..config import CHECKOUT_ROOT, load_settings
from .client import BenchError, StreamResult
from .harness import log_tail, spawn, terminate
from .results import INPROCESS, Results
from .setupinfo import versions


def inprocess_worker(spec_path: Path) -> int:
    """Load the model exactly as mlxd does, say ready, then time ``mlx_lm.stream_generate``
    for each request line (``{"messages": [...], "max_tokens": N}``) until stdin closes."""
    # The protocol owns the original stdout; anything else printed goes to stderr (the log).
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    spec = json.loads(spec_path.read_text())
    from ..backend import device_info, preload_blas

    settings = load_settings(Path(spec["config"]))
    choice = preload_blas(settings.engine.blas)

    from mlx_lm import stream_generate

    from ..engine.loader import load
    from ..prompt import build_prompt

    lm = load(settings.model)
    step = settings.engine.prefill_step_size

    def run(messages: list[dict[str, str]], max_tokens: int) -> dict[str, float | int]:
        ids = build_prompt(lm, messages).ids
        start = time.perf_counter()
        first = last = 0.0
        n = 0
        for _ in stream_generate(
            lm.model, lm.tokenizer, ids, max_tokens=max_tokens, prefill_step_size=step
        ):
            now = time.perf_counter() - start
            n += 1
            if n == 1:
                first = now
            last = now
        return {"ttft": first, "last": last, "prompt_tokens": len(ids), "completion_tokens": n}

    for i in range(spec.get("warmups", 1)):
        run([{"role": "user", "content": f"[warmup {i}] Say hello."}], 4)
    info = {
        "blas": choice.library or "mlx-bundled reference BLAS",
        "blas_reason": choice.reason,
        "device": device_info(),
        "dtype": lm.dtype,
        "prefill_step_size": step,
        "versions": versions(),
    }
    proto.write(json.dumps({"ready": True, "info": info}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        proto.write(json.dumps(run(request["messages"], request["max_tokens"])) + "\n")
    return 0


class InProcess:
    """The worker, asked for one generation at a time (:meth:`generate`) by the suites."""

    name = INPROCESS

    def __init__(self, config: Path, env: dict[str, str], tmp: Path, warmups: int) -> None:
        spec = tmp / "inprocess.json"
        spec.write_text(json.dumps({"config": str(config), "warmups": warmups}))
        self.log = tmp / "inprocess.log"
        cmd = [sys.executable, "-m", "mlxd.bench", "--inprocess-worker", str(spec)]
        self.process = spawn(cmd, env, self.log, cwd=CHECKOUT_ROOT, isolate=True, pipes=True)
        self.info: dict[str, Any] = {}
        self._buffer = b""

    def wait_ready(self, timeout: float) -> None:
        """Until the worker has loaded and warmed up its model."""
        self.info = self._read(timeout, "loading the model")["info"]

    def generate(
        self, messages: list[dict[str, str]], max_tokens: int, timeout: float
    ) -> StreamResult:
        stdin = self.process.stdin
        assert stdin is not None
        try:
            stdin.write(
                json.dumps({"messages": messages, "max_tokens": max_tokens}).encode() + b"\n"
            )
            stdin.flush()
        except BrokenPipeError:
            raise BenchError(f"the in-process worker exited:\n{log_tail(self.log)}") from None
        r = self._read(timeout, "a generation")
        return StreamResult(
            ttft=r["ttft"],
            last=r["last"],
            end=r["last"],
            completion_tokens=r["completion_tokens"],
            prompt_tokens=r["prompt_tokens"],
            cached_tokens=None,
            text="",
        )

    def stop(self) -> None:
        """Close its stdin (it exits after the generation in hand), then make sure it is gone."""
        if self.process.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.process.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)
        terminate(self.process, 10)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def _read(self, timeout: float, what: str) -> dict[str, Any]:
        """The worker's next line; a clear error if it exits or takes longer than ``timeout``."""
        stdout = self.process.stdout
        assert stdout is not None
        fd = stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"in-process worker: {what} took longer than {timeout:.0f}s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    self.process.wait(10)
                    raise BenchError(
                        f"the in-process worker exited ({self.process.returncode}) during "
                        f"{what}:\n{log_tail(self.log)}"
                    )
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        result: dict[str, Any] = json.loads(line)
        return result


def record_inprocess_setup(results: Results, info: dict[str, Any]) -> None:
    results.setup[INPROCESS] = info
    results.emit(
        {"server": INPROCESS, "metric": "setup", "value": None, "unit": None, "info": info}
    )
