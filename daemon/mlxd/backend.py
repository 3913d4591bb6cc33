"""Which MLX backend serves, and the CPU backend's BLAS.

``mlx[cpu]`` on Linux links a reference BLAS that is ~30x slower than OpenBLAS for the
matrix products a model runs. Loading OpenBLAS with ``RTLD_GLOBAL`` *before* ``mlx.core`` is
imported makes the dynamic linker resolve MLX's ``cblas_*``/``*gemm_`` symbols to it. So
:func:`preload_blas` must run before anything imports mlx; :mod:`mlxd.cli` calls it first.

MLX's CUDA backend compiles kernels on first use (NVRTC; up to tens of seconds for a model's
first prefill) and caches them on disk, by default under ``/tmp/mlx/<version>/ptx``, which a
reboot or a tmp cleaner empties. :func:`set_kernel_cache` points ``MLX_PTX_CACHE_DIR`` at the
state directory instead (read once, when MLX compiles its first kernel), so a restart reuses
them. Metal and the CPU backend ignore the variable.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

_CANDIDATES = (
    "/usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/*-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/local/lib/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)


@dataclass(frozen=True)
class BlasChoice:
    """What :func:`preload_blas` did: the library loaded (or None) and why."""

    library: str | None
    reason: str


_choice: BlasChoice | None = None


def preload_blas(setting: str = "auto") -> BlasChoice:
    """Load an optimized BLAS into the process if useful. Idempotent; call before mlx import.

    ``setting`` is ``[engine] blas``: "auto", "off" or a path. On macOS MLX uses Accelerate
    and Metal, so nothing is loaded there.
    """
    global _choice
    if _choice is not None:
        return _choice
    if "mlx.core" in sys.modules:
        _choice = BlasChoice(None, "mlx was imported before the BLAS could be chosen")
    elif setting == "off":
        _choice = BlasChoice(None, "disabled by engine.blas = 'off'")
    elif sys.platform == "darwin":
        _choice = BlasChoice(None, "macOS: MLX uses Accelerate")
    else:
        paths = [setting] if setting != "auto" else _find_openblas()
        _choice = BlasChoice(None, "no OpenBLAS found (install libopenblas0-pthread)")
        for path in paths:
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError as exc:
                _choice = BlasChoice(None, f"cannot load {path}: {exc}")
                continue
            _choice = BlasChoice(os.path.realpath(path), "loaded")
            break
    return _choice


def _find_openblas() -> list[str]:
    found = [p for pattern in _CANDIDATES for p in sorted(glob.glob(pattern))]
    name = ctypes.util.find_library("openblas")
    if name:
        found.append(name)
    return list(dict.fromkeys(found))


def blas_choice() -> BlasChoice:
    """The choice made at start (``auto`` if nothing chose yet)."""
    return _choice if _choice is not None else preload_blas("auto")


#: MLX (CUDA backend) reads its compiled-kernel cache directory from this variable.
KERNEL_CACHE_ENV = "MLX_PTX_CACHE_DIR"


def set_kernel_cache(state_dir: Path) -> str | None:
    """Keep MLX's compiled CUDA kernels in ``<state_dir>/kernels/mlx-<version>``.

    Call before mlx is imported. A ``MLX_PTX_CACHE_DIR`` already set in the environment wins
    (several processes can share one cache). The directory is per MLX version, because a
    cached kernel is only valid for the MLX build that compiled it. Returns the directory in
    use, or None if it can no longer be chosen.
    """
    if os.environ.get(KERNEL_CACHE_ENV):
        return os.environ[KERNEL_CACHE_ENV]
    if "mlx.core" in sys.modules:
        return None
    try:
        mlx_version = version("mlx")
    except PackageNotFoundError:
        mlx_version = "unknown"
    path = str(state_dir / "kernels" / f"mlx-{mlx_version}")
    os.environ[KERNEL_CACHE_ENV] = path
    return path


#: Environment defaults for MLX's CUDA backend, applied before mlx is imported unless the
#: user set them. cuDNN's attention did per-prompt-length setup work (~100 ms the first time
#: each new length was seen) and was slower on a 2,577-token prompt on the H100 (179-209 ms
#: vs 82-131 ms with MLX's own kernel); see docs/gpu.md.
CUDA_ENV_DEFAULTS = {"MLX_CUDA_USE_CUDNN_SDPA": "0"}


def apply_cuda_env_defaults() -> None:
    """Set :data:`CUDA_ENV_DEFAULTS` where the environment does not already decide."""
    for key, value in CUDA_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def device_info() -> dict[str, str]:
    """The MLX device in use: ``{"device": "gpu"|"cpu", "backend": "metal"|"cuda"|"cpu"}``."""
    import mlx.core as mx

    device = mx.default_device()
    kind = "gpu" if device.type == mx.gpu else "cpu"
    if kind == "cpu":
        backend = "cpu"
    elif mx.metal.is_available():
        backend = "metal"
    else:
        backend = "cuda" if _cuda_available() else "gpu"
    info = {"device": kind, "backend": backend}
    if backend == "cpu":
        info["blas"] = blas_choice().library or "mlx-bundled reference BLAS"
    if backend == "cuda":
        info["kernel_cache"] = os.environ.get(KERNEL_CACHE_ENV) or "/tmp/mlx/<version>/ptx"
    return info


def _cuda_available() -> bool:
    import mlx.core as mx

    cuda = getattr(mx, "cuda", None)
    return bool(cuda is not None and cuda.is_available())
