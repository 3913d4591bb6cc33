"""Local-user and browser security of the real daemon: files for the owner only, no open
network bind without a key, foreign pages refused."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Daemon

pytestmark = pytest.mark.e2e


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_fresh_state_is_owner_only(start_daemon: Callable[..., Daemon]) -> None:
    """A new state dir is 0700; the database, its WAL and the log are 0600 (they were 0755
    and 0644: every local user could read every conversation)."""
    d = start_daemon()
    with d.http() as http:
        resp = http.post("/v1/responses", json={"input": "hi", "max_output_tokens": 2})
        assert resp.status_code == 200, resp.text
    assert mode(d.state_dir) == 0o700
    created = [p for p in d.state_dir.rglob("*") if p.is_file()]
    assert any(p.name.endswith("-wal") for p in created), created
    for path in created:
        if "kernel" not in str(path):  # MLX's compiled-kernel cache holds no user data
            assert mode(path) & 0o077 == 0, (path, oct(mode(path)))
    assert mode(d.log_path) == 0o600


def test_open_bind_with_empty_key_file_refuses_to_start(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """host 0.0.0.0 with a key file holding no keys exits 78 (final for service managers)
    with the reason, instead of serving every interface unauthenticated."""
    keys = tmp_path / "keys"
    keys.write_text("# none yet\n")
    d = start_daemon(
        f'[server]\nhost = "0.0.0.0"\n[security]\napi_key_file = "{keys}"\n', wait=False
    )
    assert d.process.wait(60) == 78
    assert "holds no keys" in d.stderr_tail()


def test_text_plain_post_from_foreign_page_does_not_run(shared_daemon: Daemon) -> None:
    """The classic cross-site POST (text/plain from http://evil.example) is 403 and nothing
    is generated or stored."""
    with shared_daemon.http() as http:
        resp = http.post(
            "/v1/responses",
            content=b'{"input": "hi", "max_output_tokens": 2}',
            headers={"Origin": "http://evil.example", "Content-Type": "text/plain"},
        )
    assert resp.status_code == 403
    assert resp.json()["error"]["code"] == "origin_not_allowed"
