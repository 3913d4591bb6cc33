"""Shared fixtures: the real daemon as a subprocess, and an OpenAI SDK client for it.

The suite has three tiers, one folder each, marked by folder (``-m unit``, ``-m app``,
``-m e2e``): ``unit/`` (no model, no daemon), ``app/`` (in-process: the Quart app or the
engine, the real bundled model where needed) and ``e2e/`` (the real daemon as a subprocess).
A test outside ``e2e/`` that asks for a daemon fixture is a collection error, so the fast
tiers never start one.

``shared_daemon`` is one daemon for the whole session (tests that only read from it);
``start_daemon`` starts a private one for tests that change config, send signals or kill it.
Every daemon gets its own free port and temporary state directory, so tests never touch the
user's real state and never collide.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mlxd.backend import preload_blas

# In-process tests load models too: choose the BLAS before any test module imports mlx.
preload_blas()

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 90.0


def assert_openai_error(resp: httpx.Response, status: int) -> dict[str, Any]:
    """``resp`` has ``status`` and an OpenAI error body; returns its ``error`` object."""
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert err["message"]
    return dict(err)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Exposition text as {(sample name, sorted labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Daemon:
    """A running ``python -m mlxd`` with its port, files and process."""

    process: subprocess.Popen[bytes]
    port: int
    state_dir: Path
    config_path: Path
    env: dict[str, str]
    stderr_path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "logs" / "mlxd.log"

    def client(self, **kwargs: Any) -> openai.OpenAI:
        kwargs.setdefault("api_key", "unused")
        kwargs.setdefault("timeout", 60.0)
        kwargs.setdefault("max_retries", 0)
        return openai.OpenAI(base_url=f"{self.base_url}/v1", **kwargs)

    def http(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", 30.0)
        return httpx.Client(base_url=self.base_url, **kwargs)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"daemon exited with {self.process.returncode}: {self.stderr_tail()}"
                )
            try:
                resp = httpx.get(f"{self.base_url}/health", timeout=2.0)
                last = resp.json()
                if resp.status_code == 200:
                    return dict(last)
            except (httpx.HTTPError, json.JSONDecodeError) as exc:
                last = exc
            time.sleep(0.2)
        raise TimeoutError(f"daemon not ready after {timeout}s: {last}; {self.stderr_tail()}")

    def stderr_tail(self, n: int = 4000) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def log_events(self) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        return [json.loads(ln) for ln in self.log_path.read_text().splitlines() if ln.strip()]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return int(self.process.returncode)


def spawn_daemon(
    tmp: Path,
    config: str = "",
    *,
    env: dict[str, str] | None = None,
    args: list[str] | None = None,
    port: int | None = None,
    state_dir: Path | None = None,
) -> Daemon:
    """Start ``python -m mlxd`` with a config file in ``tmp``; does not wait for ready."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    state_dir = state_dir or tmp / "state"
    config_path = tmp / "mlxd.toml"
    if not config_path.exists() or config:
        config_path.write_text(config)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MLXD_")}
    full_env.update(
        {
            "MLXD_SERVER__PORT": str(port),
            "MLXD_SERVER__STATE_DIR": str(state_dir),
            "MLXD_LOGGING__FORMAT": "json",
            "PYTHONUNBUFFERED": "1",
        }
    )
    full_env.update(env or {})
    stderr_path = tmp / f"stderr-{port}.log"
    with stderr_path.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlxd", "--config", str(config_path), *(args or [])],
            cwd=ROOT,
            env=full_env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    return Daemon(process, port, state_dir, config_path, full_env, stderr_path)


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Factory: ``start_daemon(config_text, wait=True, **kw)``; every daemon is stopped after."""
    started: list[Daemon] = []

    def start(config: str = "", *, wait: bool = True, sub: str = "d", **kw: Any) -> Daemon:
        d = spawn_daemon(tmp_path / f"{sub}{len(started)}", config, **kw)
        started.append(d)
        if wait:
            d.wait_ready()
        return d

    yield start
    for d in started:
        with contextlib.suppress(Exception):
            d.stop(signal.SIGKILL if d.process.poll() is None else signal.SIGTERM, timeout=5)


@contextlib.contextmanager
def running_daemon(tmp: Path, config: str = "", **kw: Any) -> Iterator[Daemon]:
    """A ready daemon for a ``with`` block (module- and session-scoped fixtures)."""
    d = spawn_daemon(tmp, config, **kw)
    try:
        d.wait_ready()
        yield d
    finally:
        d.stop(timeout=20)


@pytest.fixture(scope="session")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon with the default config, for tests that do not change its state."""
    with running_daemon(tmp_path_factory.mktemp("shared")) as d:
        yield d


@pytest.fixture
def client(shared_daemon: Daemon) -> openai.OpenAI:
    return shared_daemon.client()


@pytest.fixture
def http(shared_daemon: Daemon) -> Iterator[httpx.Client]:
    with shared_daemon.http() as c:
        yield c


TIERS = ("unit", "app", "e2e")
DAEMON_FIXTURES = {"shared_daemon", "start_daemon", "client", "http"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test with its tier (its folder) and keep daemons out of the fast tiers."""
    for item in items:
        tier = next((t for t in TIERS if f"/tests/{t}/" in str(item.path)), None)
        if tier is None:
            raise pytest.UsageError(f"{item.nodeid}: tests live in tests/{{unit,app,e2e}}/")
        item.add_marker(getattr(pytest.mark, tier))
        wanted = DAEMON_FIXTURES & set(getattr(item, "fixturenames", ()))
        if tier != "e2e" and wanted:
            raise pytest.UsageError(
                f"{item.nodeid}: uses {sorted(wanted)}; tests that start a daemon go in tests/e2e/"
            )
