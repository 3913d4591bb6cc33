"""What each side ran with: BLAS actually mapped, weights, versions, machine, and the
reference's model (exported from a GGUF when mlx_lm.server cannot read the file)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..config import CHECKOUT_ROOT
from .client import BenchError
from .harness import Server
from .results import MLXD, Results
from .workload import Workload

#: mlx_lm.server defaults worth knowing when reading its numbers (from its --help).
REFERENCE_DEFAULTS = {
    "max_tokens": 512,
    "prefill_step_size": 2048,
    "prompt_cache_size": 10,
    "decode_concurrency": 32,
    "prompt_concurrency": 8,
    "temp": 0.0,
}


def mapped_blas(pid: int) -> dict[str, Any]:
    """Which BLAS a running MLX process computes with, from its mapped libraries (Linux).

    numpy/scipy wheels carry a private OpenBLAS whose symbols are renamed
    (``scipy_cblas_sgemm64_``), so MLX cannot use it even though it is mapped; only an
    OpenBLAS with the plain ``cblas_*`` names (what mlxd preloads) replaces MLX's bundled one.
    """
    if sys.platform == "darwin":
        return {"blas": "Accelerate (macOS)"}
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return {"blas": "unknown"}
    libs = sorted({ln.split()[-1] for ln in maps.splitlines() if "blas" in ln.lower()})
    usable = [
        p
        for p in libs
        if "openblas" in p.lower()
        and "scipy_openblas" not in p
        and "numpy.libs" not in p
        and "scipy.libs" not in p
    ]
    if usable:
        blas = f"OpenBLAS ({usable[0]})"
    elif any("mlx_cpu.libs" in p for p in libs):
        blas = "mlx-bundled reference BLAS"
    else:
        blas = "unknown"
    return {"blas": blas, "blas_libraries_mapped": libs}


def describe_weights(model_dir: str) -> str:
    """'quantized 4-bit' / 'float16' ... from an MLX/HF directory's config.json."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "unknown"
    quant = config.get("quantization") or config.get("quantization_config")
    if isinstance(quant, dict):
        bits = sorted(
            {v["bits"] for v in quant.values() if isinstance(v, dict) and "bits" in v}
            | ({quant["bits"]} if "bits" in quant else set())
        )
        return "quantized " + "/".join(f"{b}-bit" for b in bits) + " (as stored)"
    return str(config.get("torch_dtype", "unknown")) + " (as stored)"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("mlx", "mlx-lm"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def reference_model(model: str, config: Path, env: dict[str, str], tmp: Path) -> tuple[str, str]:
    """What ``mlx_lm.server --model`` gets for ``model``, and how it was obtained."""
    from ..errors import ModelLoadError
    from ..models.source import resolve

    try:
        source = resolve(model, download=False)
    except ModelLoadError:
        return model, "passed through (Hugging Face repo id)"
    if source.kind in ("directory", "huggingface"):
        return str(source.path), f"{source.kind} used as is"
    out = tmp / "reference-model"
    cmd = [sys.executable, "-m", "mlxd", "--config", str(config), "export-model", str(out)]
    done = subprocess.run(
        cmd, cwd=CHECKOUT_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    if done.returncode != 0:
        raise BenchError(
            f"exporting {model} for mlx_lm.server failed ({done.returncode}): {done.stderr[-2000:]}"
        )
    return str(out), f"exported from {source.path} by `mlxd export-model` (dtype as stored)"


def record_setup(
    servers: list[Server], results: Results, model: str, work: Workload, args: argparse.Namespace
) -> None:
    machine = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    results.setup["machine"] = machine
    results.setup["model"] = model
    for s in servers:
        info: dict[str, Any] = {
            "command": s.command[1:],
            "port": s.port,
            **mapped_blas(s.process.pid),
        }
        if s.name == MLXD:
            health = s.info.get("health", {})
            info |= {
                "backend": health.get("backend"),
                "model": health.get("model"),
                "version": health.get("version"),
                "distributed": health.get("distributed"),
            }
        else:
            info |= {k: v for k, v in s.info.items() if k != "health"}
            info["weights"] = describe_weights(s.info["model"])
            info["versions"] = versions()
            info["defaults"] = REFERENCE_DEFAULTS | {"extra_args": args.reference_arg}
        results.setup[s.name] = info
        results.emit(
            {"server": s.name, "metric": "setup", "value": None, "unit": None, "info": info}
        )
