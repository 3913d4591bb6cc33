"""The default config and service templates: the checkout's files from a checkout, the
packaged copies (pyproject's wheel force-include) when mlxd is installed elsewhere."""

from __future__ import annotations

import json
import shutil
import sys
import tomllib
from pathlib import Path

from conftest import ROOT, run_command, run_mlxd
from mlxd import resources
from mlxd.bench.harness import child_env


def _installed_copy(site: Path) -> Path:
    """The package laid out as the wheel installs it: daemon/mlxd plus the force-included
    files, read from pyproject.toml so the test follows the real build mapping."""
    shutil.copytree(
        ROOT / "daemon" / "mlxd", site / "mlxd", ignore=shutil.ignore_patterns("__pycache__")
    )
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]
    for source, target in build["targets"]["wheel"]["force-include"].items():
        (site / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / source, site / target)
    return site / "mlxd"


def test_checkout_uses_its_own_files() -> None:
    """From the checkout, the default config is etc/mlxd.toml (the file users edit there)."""
    assert resources.checkout_root() == ROOT
    assert resources.default_config_path() == ROOT / "etc" / "mlxd.toml"
    assert resources.template_text("mlxd.service.in") == (
        ROOT / "launchd" / "mlxd.service.in"
    ).read_text(encoding="utf-8")


def test_installed_package_works_outside_a_checkout(tmp_path: Path) -> None:
    """Installed elsewhere and run from an unrelated directory, mlxd reads the packaged
    default config (identical to etc/mlxd.toml) and renders its service templates."""
    package = _installed_copy(tmp_path / "site")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(tmp_path / "site"), "MLXD_SERVER__STATE_DIR": str(tmp_path / "state")}
    done = run_mlxd("check-config", env=env, cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["config_file"] == str(package / "data" / "mlxd.toml")
    assert (package / "data" / "mlxd.toml").read_text() == (ROOT / "etc" / "mlxd.toml").read_text()

    script = (
        "import sys; from pathlib import Path; from mlxd import agent, resources\n"
        "assert resources.checkout_root() is None, resources.checkout_root()\n"
        "spec = agent.build_spec(resources.default_config_path())\n"
        "assert spec.python == Path(sys.executable), spec.python\n"
        "agent.validate_plist(agent.render_plist(spec, Path.home()))\n"
        "print(agent.render_unit(spec))\n"
    )
    unit = run_command([sys.executable, "-c", script], env=child_env(env), cwd=elsewhere)
    assert unit.returncode == 0, unit.stderr
    assert f"--config {package / 'data' / 'mlxd.toml'}" in unit.stdout
    assert "@" not in unit.stdout  # every placeholder filled in
