"""Browser and local-user security at the edge, in-process: Origin, content type, what
callers without a key may see. Refused requests never reach the (unreachable) engine."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from test_request_edge import UnreachableEngine, call

from mlxd.api.app import AppState, create_app
from mlxd.config import Settings

FOREIGN = ["http://evil.example", "null", "file://", "http://localhost.evil.example"]
STATE_CHANGING = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/responses"),
    ("POST", "/v1/messages"),
    ("DELETE", "/v1/responses/resp_123"),
]
KEYED = Settings(security={"api_keys": ["k-123456"]})  # type: ignore[arg-type]


@pytest.mark.parametrize("origin", FOREIGN)
@pytest.mark.parametrize(("method", "path"), STATE_CHANGING)
def test_foreign_origin_is_403_before_anything_runs(origin: str, method: str, path: str) -> None:
    """A request from a page on another origin is refused whatever its content type; it used
    to run (and be stored) with only the reply hidden by CORS."""
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "input": "hi"}).encode()
    status, reply = call(
        method, path, body=body, headers={"Origin": origin, "Content-Type": "text/plain"}
    )
    assert status == 403, reply
    if "messages" not in path:  # Anthropic's error shape carries no code
        assert reply["error"]["code"] == "origin_not_allowed"


def test_foreign_origin_preflight_is_refused() -> None:
    status, _ = call(
        "OPTIONS",
        "/v1/chat/completions",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert status == 403


def test_local_origin_is_served() -> None:
    """Pages on localhost (any port) keep working, as the CORS rules say."""
    status, reply = call("GET", "/v1/models", headers={"Origin": "http://localhost:3000"})
    assert status == 200, reply


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"],
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses", "/v1/messages"])
def test_state_changing_request_without_json_content_type_is_415(
    content_type: str | None, path: str
) -> None:
    """A POST not declared as JSON is 415 unsupported_media_type (closes form and text/plain
    cross-site requests even from clients that send no Origin)."""
    headers = {"Content-Type": content_type} if content_type else {}
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    status, reply = call("POST", path, body=body, headers=headers)
    assert status == (400 if "messages" in path else 415), reply  # Anthropic has no 415
    if "messages" not in path:  # Anthropic's error shape carries no code
        assert reply["error"]["code"] == "unsupported_media_type"


def health(headers: dict[str, str]) -> dict[str, Any]:
    status, reply = call("GET", "/health", headers=headers, settings=KEYED)
    assert status == 200
    return reply


def test_health_without_key_shows_liveness_only_when_keys_are_set() -> None:
    """With keys configured, /health without one says only whether the daemon is up (no model
    path, reload errors, queue); with a valid key it says everything."""
    assert health({}) == {"status": "ok"}
    assert health({"Authorization": "Bearer wrong"}) == {"status": "ok"}
    full = health({"Authorization": "Bearer k-123456"})
    assert {"model", "last_reload", "queue_depth", "version"} <= set(full)


def test_metrics_needs_a_key_when_keys_are_set() -> None:
    st = AppState(settings=KEYED, engine=UnreachableEngine())  # type: ignore[arg-type]
    st.api_keys = ["k-123456"]
    app = create_app(st)

    async def go() -> tuple[int, int]:
        async with app.test_app():
            client = app.test_client()
            without = await client.get("/metrics")
            with_key = await client.get("/metrics", headers={"x-api-key": "k-123456"})
            return without.status_code, with_key.status_code

    assert asyncio.run(go()) == (401, 200)
