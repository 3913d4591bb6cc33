"""A GGUF model written as an MLX model directory (what ``mlx_lm.load`` and
``mlx_lm.server`` read), published atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx

from .convert import convert
from .tokenizer import special_tokens_map


def export_mlx_dir(gguf_path: Path, out_dir: Path, *, dequantize: mx.Dtype | None = None) -> Path:
    """Write the GGUF model as an MLX model directory and return its path.

    The directory holds what ``mlx_lm.load`` / ``mlx_lm.server --model`` read: config.json
    (with a per-layer ``quantization`` entry when kept quantized), model.safetensors,
    tokenizer.json, tokenizer_config.json, special_tokens_map.json and
    generation_config.json. It is built in a temporary sibling directory and renamed into
    place, so a crash never leaves a half-written model at ``out_dir``; an existing
    ``out_dir`` is replaced.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    converted = convert(gguf_path, dequantize)
    spec = converted.tokenizer
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        mx.save_safetensors(
            str(tmp / "model.safetensors"), converted.weights, metadata={"format": "mlx"}
        )
        _fsync(tmp / "model.safetensors")
        _write_json(tmp / "config.json", dict(sorted(converted.config.items())))
        spec.backend.save(str(tmp / "tokenizer.json"))
        special = special_tokens_map(spec)
        tokenizer_config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            "model_max_length": spec.model_max_length,
            "add_bos_token": spec.add_bos_token,
            "add_eos_token": False,
            **special,
        }
        if spec.chat_template is not None:
            tokenizer_config["chat_template"] = spec.chat_template
        _write_json(tmp / "tokenizer_config.json", tokenizer_config)
        _write_json(tmp / "special_tokens_map.json", special)
        generation: dict[str, Any] = {"eos_token_id": spec.eos_token_ids}
        if spec.bos_token_id is not None:
            generation["bos_token_id"] = spec.bos_token_id
        if spec.pad_token_id is not None:
            generation["pad_token_id"] = spec.pad_token_id
        _write_json(tmp / "generation_config.json", generation)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _fsync(path: Path) -> None:
    """Flush a file (or, on POSIX, a directory entry) to disk before the rename publishes it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on Windows; nothing to do there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with path.open("w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _replace_dir(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an existing ``target`` is moved aside first, then removed."""
    _fsync(new)
    if not target.exists():
        new.rename(target)
        _fsync(target.parent)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    old.rmdir()
    target.rename(old)
    try:
        new.rename(target)
    except BaseException:
        old.rename(target)
        raise
    _fsync(target.parent)
    shutil.rmtree(old, ignore_errors=True)
