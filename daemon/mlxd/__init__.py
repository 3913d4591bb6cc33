"""mlxd: an always-on, local, OpenAI-compatible inference daemon for MLX models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mlxd")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+local"
