"""A model that cannot be loaded leaves the daemon up and says why (no crash loop)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from conftest import Daemon


def wait_for_failure(d: Daemon, timeout: float = 60) -> dict[str, object]:
    resp = d.wait_load_failed(timeout)
    assert resp.status_code == 503
    assert resp.headers.get("Retry-After")
    return dict(resp.json())


@pytest.mark.parametrize("kind", ["missing-dir", "corrupt-gguf"])
def test_unloadable_model_keeps_daemon_up(
    kind: str, start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """/health is 503 'failed' with the load error; requests get 503; the log says why."""
    if kind == "missing-dir":
        path = tmp_path / "no-such-model"
        needle = "does not exist"
    else:
        path = tmp_path / "broken.gguf"
        path.write_bytes(b"GGUF" + bytes(range(256)) * 64)
        needle = "GGUF"
    d = start_daemon(f'[model]\npath = "{path}"\n', wait=False)
    body = wait_for_failure(d)
    assert needle in str(body["error"])
    with pytest.raises(openai.InternalServerError) as err:
        d.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 503
    time.sleep(0.5)
    assert d.process.poll() is None
    events = [e for e in d.log_events() if e["event"] == "model.load_failed"]
    assert events
    assert needle in events[0]["error"]
