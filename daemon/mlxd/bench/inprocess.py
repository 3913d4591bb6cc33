"""The in-process reference: ``mlx_lm.stream_generate`` with mlxd's BLAS and model loading,
in its own subprocess, to show how much the HTTP server costs.

The worker (``python -m mlxd.bench --inprocess-worker SPEC OUT``) is the only place the
bench imports mlx, after choosing the BLAS, so the choice never leaks into the bench process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from ..config import CHECKOUT_ROOT, load_settings
from .client import BenchError
from .harness import spawn, terminate
from .results import INPROCESS, Results, median_int
from .setupinfo import versions
from .workload import LONG_PROMPTS, Workload, prefill_text, tagged


def inprocess_worker(spec_path: Path, out_path: Path) -> int:
    """Load the model exactly as mlxd does and time ``mlx_lm.stream_generate``.

    Runs as its own process (``--inprocess-worker``) so the BLAS chosen here never leaks
    into the bench process.
    """
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

    run([{"role": "user", "content": "[warmup] Say hello."}], 4)
    single = [
        run(
            [{"role": "user", "content": tagged(f"single {r}", LONG_PROMPTS[0])}],
            spec["max_tokens"],
        )
        for r in range(spec["repeats"])
    ]
    doc = prefill_text(spec["prefill_tokens"])
    prefill = [
        run([{"role": "user", "content": tagged(f"prefill {r}", doc)}], 1)
        for r in range(spec["repeats"])
    ]
    out_path.write_text(
        json.dumps(
            {
                "single": single,
                "prefill": prefill,
                "info": {
                    "blas": choice.library or "mlx-bundled reference BLAS",
                    "blas_reason": choice.reason,
                    "device": device_info(),
                    "dtype": lm.dtype,
                    "prefill_step_size": step,
                    "versions": versions(),
                },
            }
        )
    )
    return 0


def run_inprocess(
    config: Path, env: dict[str, str], work: Workload, tmp: Path, results: Results, timeout: float
) -> None:
    spec = tmp / "inprocess.json"
    out = tmp / "inprocess-result.json"
    spec.write_text(
        json.dumps(
            {
                "config": str(config),
                "max_tokens": work.max_tokens,
                "prefill_tokens": work.prefill_tokens,
                "repeats": work.repeats,
            }
        )
    )
    cmd = [sys.executable, "-m", "mlxd.bench", "--inprocess-worker", str(spec), str(out)]
    proc = spawn(cmd, env, tmp / "inprocess.log", cwd=CHECKOUT_ROOT, isolate=True)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        terminate(proc, 5)
        raise BenchError(f"in-process run took longer than {timeout:.0f}s") from None
    finally:
        terminate(proc, 5)
    if proc.returncode != 0 or not out.exists():
        tail = (tmp / "inprocess.log").read_text(errors="replace")[-2000:]
        raise BenchError(f"in-process run failed ({proc.returncode}):\n{tail}")
    data = json.loads(out.read_text())
    results.setup[INPROCESS] = data["info"]
    results.emit(
        {"server": INPROCESS, "metric": "setup", "value": None, "unit": None, "info": data["info"]}
    )
    single, prefill = data["single"], data["prefill"]
    params = {
        "max_tokens": work.max_tokens,
        "prompt_tokens": median_int([x["prompt_tokens"] for x in single]),
        "completion_tokens": median_int([x["completion_tokens"] for x in single]),
    }
    results.measurement(INPROCESS, "ttft_ms", "ms", [x["ttft"] * 1000 for x in single], **params)
    decode = [
        (x["completion_tokens"] - 1) / (x["last"] - x["ttft"])
        for x in single
        if x["completion_tokens"] > 1 and x["last"] > x["ttft"]
    ]
    results.measurement(INPROCESS, "decode_tokens_per_s", "tokens/s", decode, **params)
    results.measurement(
        INPROCESS,
        "prefill_tokens_per_s",
        "tokens/s",
        [x["prompt_tokens"] / x["ttft"] for x in prefill],
        max_tokens=1,
        prompt_tokens=median_int([x["prompt_tokens"] for x in prefill]),
        completion_tokens=1,
    )
