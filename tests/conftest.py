"""Shared fixtures: the real daemon as a subprocess, and an OpenAI SDK client for it.

The suite has three tiers, one folder each, marked by folder (``-m unit``, ``-m app``,
``-m e2e``): ``unit/`` (no model, no daemon), ``app/`` (in-process: the Quart app or the
engine, the real bundled model where needed) and ``e2e/`` (the real daemon as a subprocess).
A test outside ``e2e/`` that asks for a daemon fixture is a collection error, so the fast
tiers never start one.

``shared_daemon`` is one daemon for the whole session (tests that only read from it);
``start_daemon`` starts a private one for tests that change config, send signals or kill it.
Every daemon gets its own free port and temporary state directory, so tests never touch the
user's real state and never collide. Starting, waiting for ``/health`` and stopping are
``mlxd.bench.harness`` (the one daemon harness, shared with ``bin/bench`` and
``bin/gpu_bench.py``); this file adds the SDK clients and the fixtures.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx2 as httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mlxd.backend import preload_blas
from mlxd.bench import harness
from mlxd.bench.harness import free_port

# In-process tests load models too: choose the BLAS before any test module imports mlx.
preload_blas()

ROOT = Path(__file__).resolve().parents[1]


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


T = TypeVar("T")


def wait_until(check: Callable[[], T], timeout: float, what: str, *, interval: float = 0.1) -> T:
    """Poll ``check`` until it returns something truthy and return that; fail naming ``what``
    after ``timeout`` seconds (a generous bound for what is waited for, never a speed claim)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def run_command(
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = ROOT,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """Run a command to its end with stdout and stderr captured as text; a failing exit
    status is returned, not raised (tests assert on it)."""
    return subprocess.run(
        list(argv), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def run_mlxd(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = ROOT, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """``python -m mlxd ARGS`` with this environment minus any ``MLXD_*``, plus ``env``."""
    return run_command(
        [sys.executable, "-m", "mlxd", *args],
        env=harness.child_env(env),
        cwd=cwd,
        timeout=timeout,
    )


class Daemon(harness.Daemon):
    """A running ``python -m mlxd`` (see :class:`mlxd.bench.harness.Daemon`) with clients."""

    @property
    def stderr_path(self) -> Path:
        """Where the daemon's stdout and stderr go."""
        return self.log

    def stderr_tail(self, n: int = 4000) -> str:
        return self.log_tail(n)

    #: Default read timeouts: bounds for a hang, not speed claims; a short answer on a loaded
    #: 2-core machine without OpenBLAS can take a minute (tests that need a timeout set it).
    CLIENT_TIMEOUT = 300.0
    HTTP_TIMEOUT = 120.0

    def client(self, **kwargs: Any) -> openai.OpenAI:
        kwargs.setdefault("api_key", "unused")
        kwargs.setdefault("timeout", self.CLIENT_TIMEOUT)
        kwargs.setdefault("max_retries", 0)
        return openai.OpenAI(base_url=f"{self.base_url}/v1", **kwargs)

    def http(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", self.HTTP_TIMEOUT)
        return httpx.Client(base_url=self.base_url, **kwargs)

    def wait_load_failed(self, timeout: float = 60.0) -> httpx.Response:
        """The /health response once it reports the model load as failed; the daemon must
        stay up meanwhile (a failed load is not a reason to exit)."""

        def failed() -> httpx.Response | None:
            assert self.process.poll() is None, self.stderr_tail()
            try:
                resp = httpx.get(f"{self.base_url}/health", timeout=2)
            except httpx.HTTPError:
                return None
            return resp if resp.json().get("status") == "failed" else None

        return wait_until(failed, timeout, "/health to report the failed model load", interval=0.2)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40.0) -> int:
        return int(super().stop(sig, timeout) or 0)


def spawn_daemon(
    tmp: Path,
    config: str = "",
    *,
    env: dict[str, str] | None = None,
    args: list[str] | None = None,
    port: int | None = None,
    state_dir: Path | None = None,
    pin_port: bool = True,
    command: list[str] | None = None,
) -> Daemon:
    """Start ``python -m mlxd`` (or ``command``) with a config file in ``tmp``; does not wait
    for ready. ``pin_port=False``: the port comes from the config file."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    config_path = tmp / "mlxd.toml"
    if not config_path.exists() or config:
        config_path.write_text(config)
    return Daemon.start(
        config_path,
        state_dir=state_dir or tmp / "state",
        log=tmp / f"stderr-{port}.log",
        port=port,
        pin_port=pin_port,
        env=env,
        args=args or (),
        command=command,
        cwd=ROOT,
    )


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
