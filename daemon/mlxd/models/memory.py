"""How much memory a configured model will take, and how much all models may take together.

The estimate is read from the files without loading anything (milliseconds): weights from
the GGUF header's element counts or the safetensors file sizes, scaled to the dtype the
loader will serve (:mod:`mlxd.engine.loader` decides: ``auto`` dequantizes small quantized
models to float32 on the CPU); KV cache for the model's batch slots, each a sequence of the
entry's context length (keys and values, every layer, every KV head). KV memory in mlx-lm
grows as sequences grow, so this is the most it can reach, which is what a budget must hold.
Once a model has been loaded, the engine uses its measured weight bytes instead.

Batch slots (:func:`plan`): ``engine.max_batch_size`` when it is a number. ``auto`` gives each
model as many sequences at full context as fit in its room, at least 1 and at most
:data:`AUTO_SLOTS` for the backend: 8 on the CPU (the forward is compute-bound, more rows only
queue inside the step) and on Apple GPUs (unified memory: every slot's KV comes out of the
memory the weights and the system use), 64 on CUDA (aggregate decode still grows past 32
streams there; docs/engine.md, "Batch sizes per backend"). The room, fixed by the table and
not by what happens to be loaded:

* pinned models (always resident together) split the budget left after all their weights
  equally;
* the other models (loaded on demand) split what the pinned models leave after all their
  weights equally, so several of them can stay loaded side by side; but each gets at least
  the 8 slots of the old fixed default when those fit beside the pinned models on their own
  (a long list of models, of which one at a time is used, batches as before).

So the pinned models fit together whenever one sequence each does, a model whose KV for 8
sequences would not fit still loads with fewer, and a datacenter GPU batches up to 64 per
model. A model whose files are not here yet (a Hugging Face repo not downloaded) is sized
once loaded; until then it counts as :data:`UNKNOWN_SLOTS`.

The budget (``engine.memory_budget_bytes``; 0 derives it per platform):

* Apple GPU (Metal, unified memory): Metal's recommended working set for the device
  (``max_recommended_working_set_size``, about 2/3 to 3/4 of RAM);
* CUDA: 90% of the GPU's memory;
* CPU: 60% of physical RAM (the rest is for the OS, the prompt cache and other programs).
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ModelLoadError

if TYPE_CHECKING:
    from ..config import EngineSettings, ModelSettings, Settings

#: Mirrors loader._AUTO_DEQUANTIZE_RAM_SHARE: 'auto' dequantizes only models this small.
_AUTO_DEQUANTIZE_RAM_SHARE = 0.25
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
CPU_BUDGET_SHARE = 0.60
CUDA_BUDGET_SHARE = 0.90
GiB = 1024**3


#: ``engine.max_batch_size = "auto"``: the most batch slots per backend (module docstring).
AUTO_SLOTS = {"cpu": 8, "metal": 8, "cuda": 64}
#: The old fixed default: what an on-demand model gets at least, when it fits, and the
#: slots of a model not sized yet.
UNKNOWN_SLOTS = 8


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a model needs resident: its weights plus the most its KV cache can reach, for
    ``slots`` sequences decoded together."""

    weights_bytes: int
    kv_bytes: int
    slots: int = 1

    @property
    def total(self) -> int:
        return self.weights_bytes + self.kv_bytes


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * GiB


def default_budget(device: str, backend_name: str) -> int:
    """The budget when ``engine.memory_budget_bytes`` is 0 (rule in the module docstring)."""
    if device == "gpu":
        import mlx.core as mx

        info: dict[str, Any] = dict(mx.device_info()) if hasattr(mx, "device_info") else {}
        if backend_name == "metal" and info.get("max_recommended_working_set_size"):
            return int(info["max_recommended_working_set_size"])
        total = info.get("memory_size") or info.get("total_memory")
        if total:
            return int(int(total) * CUDA_BUDGET_SHARE)
    return int(physical_memory() * CPU_BUDGET_SHARE)


def budget(settings: Settings, device: str, backend_name: str) -> int:
    return settings.engine.memory_budget_bytes or default_budget(device, backend_name)


def batch_slots(max_batch_size: int | str, backend_name: str, room: int | None, per: int) -> int:
    """Sequences decoded together: ``max_batch_size`` when it is a number; for ``auto``, as
    many sequences of ``per`` KV bytes as ``room`` bytes hold (None: unknown), 1 to the
    backend's most (module docstring)."""
    if isinstance(max_batch_size, int):
        return max_batch_size
    most = AUTO_SLOTS.get(backend_name, AUTO_SLOTS["cpu"])
    if room is None or per <= 0:
        return most
    return max(1, min(most, room // per))


def default_backend(device: str) -> str:
    """The backend of ``device`` when it is not known better: "cpu", or the GPU's."""
    return "cpu" if device == "cpu" else "metal" if sys.platform == "darwin" else "cuda"


def estimate(
    entry: ModelSettings, engine: EngineSettings, device: str, backend_name: str | None = None
) -> MemoryEstimate | None:
    """The estimate for ``entry`` on ``device`` ("cpu"/"gpu") alone, with no budget (so
    ``auto`` gives the backend's most), or None when its files are not here yet (a Hugging
    Face repo that is not downloaded: it is counted once loaded). :func:`plan` estimates a
    whole table under a budget."""
    sizes = _sizes(entry, device)
    if sizes is None:
        return None
    weights, per = sizes
    backend_name = backend_name or default_backend(device)
    slots = batch_slots(engine.max_batch_size, backend_name, None, per)
    return MemoryEstimate(weights, per * slots, slots)


def plan(
    entries: Mapping[str, ModelSettings],
    max_batch_size: int | str,
    device: str,
    backend_name: str,
    limit: int,
) -> dict[str, MemoryEstimate | None]:
    """Every entry's estimate under a budget of ``limit`` bytes, batch slots by the rule in
    the module docstring (None for an entry whose files are not here yet)."""
    known = {i: s for i, e in entries.items() if (s := _sizes(e, device)) is not None}
    pinned = [i for i in known if entries[i].pinned]
    others = [i for i in known if not entries[i].pinned]
    out: dict[str, MemoryEstimate] = {}
    share = (limit - sum(known[i][0] for i in pinned)) // max(1, len(pinned))
    for i in pinned:
        weights, per = known[i]
        slots = batch_slots(max_batch_size, backend_name, share, per)
        out[i] = MemoryEstimate(weights, per * slots, slots)
    left = limit - sum(e.total for e in out.values())
    share = (left - sum(known[i][0] for i in others)) // max(1, len(others))
    for i in others:
        weights, per = known[i]
        even = batch_slots(max_batch_size, backend_name, share, per)
        alone = batch_slots(max_batch_size, backend_name, left - weights, per)
        slots = max(even, min(alone, UNKNOWN_SLOTS))
        out[i] = MemoryEstimate(weights, per * slots, slots)
    return {i: out.get(i) for i in entries}


def _sizes(entry: ModelSettings, device: str) -> tuple[int, int] | None:
    """(weights bytes as served, KV bytes of one sequence at the entry's context), or None
    when the files are not here."""
    from .source import resolve

    try:
        source = resolve(entry.path, download=False)
        if source.kind in ("bundled", "gguf"):
            weights, shape = _gguf(source.path, entry.dtype, device)
        else:
            weights, shape = _safetensors(source.path, entry.dtype, device)
    except (ModelLoadError, OSError, ValueError, KeyError, struct.error):
        return None
    layers, kv_heads, head_dim, model_context, per = shape
    context = entry.context_length or model_context
    per_value = 4 if per == 4 else 2  # activations (and so KV) follow float32 weights
    return weights, 2 * layers * kv_heads * head_dim * per_value * context


def _target_bytes(dtype: str, device: str, float32_bytes: int) -> int | None:
    """Bytes per weight the loader will serve, or None when it keeps the stored weights."""
    if dtype in _DTYPE_BYTES:
        return _DTYPE_BYTES[dtype]
    if dtype == "auto" and device == "cpu":
        fits = float32_bytes <= physical_memory() * _AUTO_DEQUANTIZE_RAM_SHARE
        return 4 if fits else None
    return None


def _gguf(path: Path, dtype: str, device: str) -> tuple[int, tuple[int, int, int, int, int | None]]:
    from .gguf import header_summary

    summary = header_summary(path)
    ints = summary.ints
    arch = "llama"
    layers = ints[f"{arch}.block_count"]
    heads = ints[f"{arch}.attention.head_count"]
    kv_heads = ints.get(f"{arch}.attention.head_count_kv", heads)
    head_dim = ints.get(f"{arch}.rope.dimension_count") or ints[f"{arch}.embedding_length"] // heads
    context = ints.get(f"{arch}.context_length", 4096)
    per = _target_bytes(dtype, device, summary.elements * 4)
    weights = path.stat().st_size if per is None else summary.elements * per
    return weights, (layers, kv_heads, head_dim, context, per)


def _safetensors(
    path: Path, dtype: str, device: str
) -> tuple[int, tuple[int, int, int, int, int | None]]:
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config", config)
    stored = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    bits = (config.get("quantization") or {}).get("bits")
    # Elements: quantized weights pack 32/bits per uint32 (scales are a small extra).
    elements = stored * 8 // bits if bits else stored // _source_bytes(config)
    per = _target_bytes(dtype, device, elements * 4)
    weights = stored if per is None else elements * per
    heads = int(text["num_attention_heads"])
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // heads)
    context = int(text.get("max_position_embeddings") or 4096)
    return weights, (int(text["num_hidden_layers"]), kv_heads, head_dim, context, per)


def _source_bytes(config: dict[str, Any]) -> int:
    return 4 if str(config.get("torch_dtype", "")) == "float32" else 2


def pinned_problem(settings: Settings, device: str, backend_name: str) -> str | None:
    """A config error when the pinned models alone do not fit the budget, else None."""
    from .registry import model_table

    limit = budget(settings, device, backend_name)
    table = model_table(settings)
    planned = plan(table, settings.engine.max_batch_size, device, backend_name, limit)
    pinned = [(i, est) for i, est in planned.items() if table[i].pinned and est is not None]
    need = sum(e.total for _, e in pinned)
    if need <= limit:
        return None
    parts = ", ".join(
        f"models.{i} ~{_mib(e.total)} (weights {_mib(e.weights_bytes)} + KV {_mib(e.kv_bytes)} "
        f"for {e.slots} sequence{'s' if e.slots != 1 else ''})"
        for i, e in pinned
    )
    kv = (
        "context_length (KV cache; with max_batch_size 'auto' each pinned model already has "
        "only the batch slots its share holds, at least 1)"
        if settings.engine.max_batch_size == "auto"
        else "context_length or engine.max_batch_size (KV cache)"
    )
    return (
        f"pinned models need {_mib(need)} but engine.memory_budget_bytes allows {_mib(limit)}: "
        f"{parts}. Hint: raise engine.memory_budget_bytes, lower {kv}, or set pinned = false."
    )


def _mib(n: int) -> str:
    return f"{n / 1024**2:.0f} MiB"
