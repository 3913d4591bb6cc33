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
    """What :func:`preload_blas` did: the library loaded (or None), why, and its CPU kernels."""

    library: str | None
    reason: str
    core: str | None = None


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def openblas_coretype(flags: set[str]) -> str | None:
    """The OpenBLAS kernel family these CPU flags support, for CPUs OpenBLAS cannot name.

    OpenBLAS picks its kernels from the CPU model number. Virtual machines often report a
    model it does not know, and it falls back to "Prescott" (SSE3): on this project's 2-core
    Xeon VMs a 512x576x1536 float32 matmul ran at 56 GFLOP/s that way and at 277 GFLOP/s with
    the AVX-512 kernels the CPU has. The flags say what the CPU can run, so they are a safe
    guide.
    """
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


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
        core = None
        if paths and "OPENBLAS_CORETYPE" not in os.environ:
            # Read by OpenBLAS when it loads; the user's own setting wins.
            core = openblas_coretype(_cpu_flags())
            if core is not None:
                os.environ["OPENBLAS_CORETYPE"] = core
        for path in paths:
            try:
                lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError as exc:
                _choice = BlasChoice(None, f"cannot load {path}: {exc}")
                continue
            _choice = BlasChoice(os.path.realpath(path), "loaded", _corename(lib) or core)
            break
    return _choice


def _corename(lib: ctypes.CDLL) -> str | None:
    try:
        fn = lib.openblas_get_corename
    except AttributeError:
        return None
    fn.restype = ctypes.c_char_p
    name = fn()
    return name.decode() if isinstance(name, bytes) else None


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
        choice = blas_choice()
        info["blas"] = choice.library or "mlx-bundled reference BLAS"
        if choice.core:
            info["blas_core"] = choice.core
    if backend == "cuda":
        info["kernel_cache"] = os.environ.get(KERNEL_CACHE_ENV) or "/tmp/mlx/<version>/ptx"
    return info


def _cuda_available() -> bool:
    import mlx.core as mx

    cuda = getattr(mx, "cuda", None)
    return bool(cuda is not None and cuda.is_available())
