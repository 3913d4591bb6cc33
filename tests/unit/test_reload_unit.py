"""Config reload: the service's Reloader with a fake engine (no model, no HTTP).

The service is the real one (its ``apply_config`` and ``request_restart`` are the narrow
callables the reloader gets); only its engine is replaced by a recorder.
"""

from __future__ import annotations

import ast
import asyncio
import logging
import os
import socket
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from mlxd import reload
from mlxd.config import ModelSettings, Settings, load_settings
from mlxd.errors import ModelUnavailable
from mlxd.service import Service


class FakeEngine:
    """Records what reload asks of the engine: the model tables it is given and the models
    it is asked to load (which succeed unless ``fail`` is set)."""

    def __init__(self) -> None:
        self.device = {"device": "cpu", "backend": "cpu"}
        self.tables: list[Any] = []
        self.loads: list[ModelSettings] = []
        self.retuned: list[Any] = []
        self.fail: str | None = None

    def configure(self, residency: Any) -> None:
        self.tables.append(residency)

    def acquire(self, model_id: str) -> Future[Any]:
        self.loads.append(self.tables[-1].entries[model_id])
        fut: Future[Any] = Future()
        if self.fail:
            fut.set_exception(ModelUnavailable(self.fail))
        else:
            fut.set_result(object())
        return fut

    def retune(self, settings: Any) -> None:
        self.retuned.append(settings)


def FakeService(path: Path) -> Any:
    """A real Service for ``path`` whose engine only records what reload asks of it."""
    svc = Service(load_settings(path), path)
    svc.engine = svc.state.engine = FakeEngine()  # type: ignore[assignment]
    return svc


def reload_now(svc: Any, trigger: str = "signal") -> Any:
    return svc.reloader.reload_now(trigger=trigger)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "mlxd.toml"
    path.write_text(f'[model]\ntemperature = 0.5\n[server]\nstate_dir = "{tmp_path}"\n')
    return path


@pytest.fixture(autouse=True)
def _keep_log_level() -> Any:
    level = logging.getLogger().level
    yield
    logging.getLogger().setLevel(level)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def write(path: Path, text: str) -> None:
    """Save like an editor does: temporary file in the same directory, then rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_diff_names_changed_key_paths() -> None:
    """diff() lists dotted key paths of changed values only, sorted."""
    old = Settings()
    new = Settings(model={"path": "/x", "temperature": 0.1}, logging={"level": "debug"})
    assert reload.diff(old, new) == ["logging.level", "model.path", "model.temperature"]
    assert reload.diff(old, Settings()) == []


def test_live_keys_swap_settings_without_model_load(config: Path) -> None:
    """Generation defaults and log level apply by swapping the settings; no model load."""
    svc = FakeService(config)
    write(config, config.read_text().replace("0.5", "0.2") + '[logging]\nlevel = "debug"\n')
    assert run(reload_now(svc, trigger="file"))
    assert svc.settings.model.temperature == 0.2
    assert svc.state.settings is svc.settings
    assert logging.getLogger().level == logging.DEBUG
    assert svc.engine.loads == []
    assert svc.state.last_reload is not None
    assert svc.state.last_reload["ok"] is True
    assert svc.state.last_reload["changed"] == ["logging.level", "model.temperature"]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[model\npath = ", "not valid TOML"),
        ("[model]\nbogus = 1\n", "model.bogus: unknown key"),
        ("[conversations]\nttl_seconds = -5\n", "conversations.ttl_seconds"),
        ('[security]\napi_key_file = "/nonexistent/keys"\n', "security.api_key_file"),
    ],
)
def test_invalid_file_keeps_last_good_config(config: Path, text: str, reason: str) -> None:
    """A file that does not parse or validate changes nothing; last_reload carries the reason."""
    svc = FakeService(config)
    before = svc.settings
    write(config, text)
    assert not run(reload_now(svc))
    assert svc.settings is before and svc.state.settings is before
    assert svc.state.last_reload is not None
    assert svc.state.last_reload["ok"] is False
    assert reason in svc.state.last_reload["error"]


def test_model_change_loads_then_swaps(config: Path) -> None:
    """A new [model] path is loaded on the engine first, then the settings are swapped."""
    svc = FakeService(config)
    text = config.read_text().replace("[model]\n", '[model]\npath = "/m/other"\nid = "other"\n')
    write(config, text)
    assert run(reload_now(svc))
    assert [m.path for m in svc.engine.loads] == ["/m/other"]
    assert svc.settings.model.id == "other"
    assert svc.state.last_reload is not None
    assert svc.state.last_reload["changed"] == ["model.id", "model.path"]


def test_model_that_fails_to_load_rejects_the_edit(config: Path) -> None:
    """If the new model cannot load, nothing of the edit applies and the error is recorded."""
    svc = FakeService(config)
    svc.engine.fail = "no such directory"
    before = svc.settings
    write(config, config.read_text().replace("[model]\n", '[model]\npath = "/nope"\n'))
    assert not run(reload_now(svc))
    assert svc.settings is before
    assert svc.state.last_reload is not None
    assert svc.state.last_reload["ok"] is False
    assert "no such directory" in svc.state.last_reload["error"]


def test_engine_keys_retune_engine(config: Path) -> None:
    """An [engine] change goes to Engine.retune with the new section."""
    svc = FakeService(config)
    write(config, config.read_text() + "[engine]\nmax_queue = 3\n")
    assert run(reload_now(svc))
    assert [e.max_queue for e in svc.engine.retuned] == [3]


def test_port_change_requests_orderly_restart(config: Path) -> None:
    """A new port sets restart_requested and the shutdown event (cli re-executes after)."""
    svc = FakeService(config)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    write(config, config.read_text().replace("[server]\n", f"[server]\nport = {port}\n"))
    assert run(reload_now(svc))
    assert svc.restart_requested and svc.shutdown.is_set() and svc.state.shutting_down


def test_port_in_use_is_rejected_without_restart(config: Path) -> None:
    """A port another process holds is rejected before the daemon gives up its own."""
    svc = FakeService(config)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        write(config, config.read_text().replace("[server]\n", f"[server]\nport = {port}\n"))
        assert not run(reload_now(svc))
    assert not svc.restart_requested and not svc.shutdown.is_set()
    assert svc.state.last_reload is not None
    assert "server.port" in svc.state.last_reload["error"]


def test_sighup_rereads_api_key_file(tmp_path: Path) -> None:
    """request() (the SIGHUP handler) schedules a reload that picks up a changed key file."""
    keys = tmp_path / "keys"
    keys.write_text("first\n")
    path = tmp_path / "mlxd.toml"
    path.write_text(f'[security]\napi_key_file = "{keys}"\n')
    svc = FakeService(path)
    assert svc.state.api_keys == ["first"]
    keys.write_text("# rotated\nsecond\n")

    async def main() -> None:
        svc.reloader.request()
        for _ in range(100):
            if svc.state.last_reload is not None:
                return
            await asyncio.sleep(0.02)

    run(main())
    assert svc.state.api_keys == ["second"]
    assert svc.state.last_reload is not None
    assert svc.state.last_reload["changed"] == ["security.api_key_file"]


def test_watch_applies_renamed_file_and_stops_on_shutdown(config: Path) -> None:
    """watch() sees an editor-style save (rename over the file) and ends when shutdown is set."""
    svc = FakeService(config)
    edited = config.read_text().replace("0.5", "0.9")

    async def main() -> None:
        task = asyncio.ensure_future(svc.reloader.watch())
        await asyncio.sleep(0.5)  # let the watcher start
        write(config, edited)
        for _ in range(100):
            if svc.settings.model.temperature == 0.9:
                break
            await asyncio.sleep(0.05)
        svc.shutdown.set()
        await asyncio.wait_for(task, 5)

    run(main())
    assert svc.settings.model.temperature == 0.9


# -- restart-class keys are checked before the daemon stops ----------------------------------
def test_unusable_state_dir_is_rejected_before_restart(config: Path, tmp_path: Path) -> None:
    """A state_dir that cannot be created is rejected while the daemon keeps running (the
    re-executed process used to exit 78, which service managers treat as final)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    svc = FakeService(config)
    write(config, config.read_text().replace(str(tmp_path), str(blocker / "state")))
    assert not run(reload_now(svc))
    assert not svc.restart_requested and not svc.shutdown.is_set()
    assert "server.state_dir" in svc.state.last_reload["error"]


def test_unbindable_host_is_rejected_before_restart(config: Path) -> None:
    """A host that is not an address of this machine is rejected (it used to exit 1 after
    the re-exec), also when the port stays the same."""
    svc = FakeService(config)
    write(config, config.read_text().replace("[server]\n", '[server]\nhost = "192.0.2.1"\n'))
    write(config, config.read_text() + '[security]\napi_keys = ["k-1234567890"]\n')
    assert not run(reload_now(svc))
    assert not svc.restart_requested and not svc.shutdown.is_set()
    assert "server.host" in svc.state.last_reload["error"]


def test_unopenable_log_file_keeps_the_old_handlers(config: Path, tmp_path: Path) -> None:
    """A logging.file that cannot be opened is rejected and logging carries on through the
    old handlers (all logging used to stop)."""
    from mlxd.logs import setup_logging

    svc = FakeService(config)
    setup_logging(svc.settings.logging, tmp_path / "old.log", console=False)
    before = [h for h in logging.getLogger().handlers if getattr(h, "_mlxd_handler", False)]
    (tmp_path / "dir.log").mkdir()
    write(config, config.read_text() + f'[logging]\nfile = "{tmp_path / "dir.log"}"\n')
    assert not run(reload_now(svc))
    assert "logging.file" in svc.state.last_reload["error"]
    after = [h for h in logging.getLogger().handlers if getattr(h, "_mlxd_handler", False)]
    assert after == before
    for h in after:
        logging.getLogger().removeHandler(h)
        h.close()


def test_setup_logging_failure_leaves_existing_handlers(tmp_path: Path) -> None:
    from mlxd.config import LoggingSettings
    from mlxd.logs import setup_logging

    setup_logging(LoggingSettings(), tmp_path / "ok.log", console=False)
    before = list(logging.getLogger().handlers)
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError):
        setup_logging(LoggingSettings(), tmp_path / "d", console=False)
    assert logging.getLogger().handlers == before
    for h in before:
        if getattr(h, "_mlxd_handler", False):
            logging.getLogger().removeHandler(h)
            h.close()


def test_reload_module_does_not_import_the_service() -> None:
    """The service owns the reloader, never the other way round (no import cycle, no
    module-level lock or task set)."""
    tree = ast.parse(Path(reload.__file__).read_text())
    imported = {
        (node.module or "") for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
    } | {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    assert not any(name.endswith("service") for name in imported), imported
    names = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        if isinstance(node, ast.AnnAssign):
            targets = [node.target]
        names |= {t.id for t in targets if isinstance(t, ast.Name)}
    assert not {"_locks", "_pending"} & names
