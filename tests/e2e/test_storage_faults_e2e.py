"""Storage faults under the real daemon: a store that cannot write is a clear error on both
paths (an error status naming the cause; a terminal ``response.failed`` event), never a 200
that is silently lost."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from conftest import Daemon

pytestmark = pytest.mark.e2e

BODY = {"input": "Say hi.", "max_output_tokens": 3}


def test_deleted_database_refuses_stored_writes_on_both_paths(
    start_daemon: Callable[..., Daemon],
) -> None:
    d = start_daemon()
    with d.http(timeout=60) as http:
        assert http.post("/v1/responses", json=BODY).status_code == 200
        for f in d.state_dir.glob("*.sqlite3*"):
            f.unlink()
        resp = http.post("/v1/responses", json=BODY)
        assert resp.status_code == 500, resp.text
        err = resp.json()["error"]
        assert err["code"] == "storage_error"
        assert "deleted or replaced" in err["message"]

        with http.stream("POST", "/v1/responses", json={**BODY, "stream": True}) as stream:
            events = [json.loads(ln[6:]) for ln in stream.iter_lines() if ln.startswith("data: ")]
        assert events[-1]["type"] == "response.failed", [e["type"] for e in events]
        assert events[-1]["response"]["error"]["code"] == "storage_error"

        unstored = http.post("/v1/responses", json={**BODY, "store": False})
        assert unstored.status_code == 200  # nothing to write, nothing refused
    assert any(e["event"] == "store.file_replaced" for e in d.log_events())
