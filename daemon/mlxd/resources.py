"""Where mlxd's own files are: the default config and the service templates.

They live at the top of the source checkout (``etc/mlxd.toml``, ``launchd/*.in``), which is
where a checkout user edits the config, and the wheel carries copies inside the package
(``mlxd/data/``, mapped by ``[tool.hatch.build.targets.wheel.force-include]`` in
pyproject.toml), so an installed ``mlxd`` works from any directory. Which one applies is
decided by where this file is, never by the working directory: running from
``<checkout>/daemon/mlxd`` (``bin/``, an editable install) means the checkout's files; any
other place (a wheel in some environment) means the packaged copies, read through
``importlib.resources``. ``etc/mlxd.toml`` stays the one source of truth: it is generated
(``mlxd check-config --render-toml``) and checked by tests/unit/test_config.py; the wheel's
copy is made from it at build time.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

#: Package-relative folder of the files the wheel carries.
DATA_DIR = "data"
CONFIG_NAME = "mlxd.toml"


def checkout_root() -> Path | None:
    """The source checkout this package is imported from, or None when it is installed."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "daemon" / "mlxd").is_dir():
        return root
    return None


def _packaged(name: str) -> Path:
    # A wheel is always unpacked to files (never imported from a zip), so the resource is a
    # real path: the daemon watches the config file for changes and needs one.
    return Path(str(resources.files("mlxd").joinpath(DATA_DIR, name)))


def default_config_path() -> Path:
    """``<checkout>/etc/mlxd.toml`` in a checkout, else the packaged default config."""
    root = checkout_root()
    return root / "etc" / CONFIG_NAME if root is not None else _packaged(CONFIG_NAME)


def template_text(name: str) -> str:
    """A service template (``mlxd.service.in``, ``io.mlxd.daemon.plist.in``)."""
    root = checkout_root()
    path = root / "launchd" / name if root is not None else _packaged(name)
    return path.read_text(encoding="utf-8")
