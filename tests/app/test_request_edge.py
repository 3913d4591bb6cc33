"""The request edge in-process: what is refused before any route, engine or store runs.

The engine here is a fake that fails the test if a request ever reaches it: everything
these tests send must be answered at the edge (body checks, headers), on every route.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from mlxd.api.app import AppState, create_app
from mlxd.api.body import MAX_DEPTH
from mlxd.config import Settings
from mlxd.engine.protocol import EngineStatus

ROUTES = ["/v1/chat/completions", "/v1/responses"]
JSON_HEADERS = {"content-type": "application/json"}


@dataclass
class UnreachableEngine:
    """Read-only engine fields for /health and /v1/models; generation must never start."""

    current: Any = None
    state: str = "ready"
    device: dict[str, str] = field(default_factory=lambda: {"device": "cpu", "backend": "cpu"})
    load_error: str | None = None
    group: Any = None  # not a process group (mlxd.engine.distributed)

    def queue_depth(self) -> int:
        return 0

    def active_count(self) -> int:
        return 0

    def cache_status(self) -> dict[str, dict[str, int]]:
        return {}

    def require_model(self) -> Any:
        raise AssertionError("a request that should be refused at the edge reached the engine")

    def acquire(self, model_id: str) -> Any:
        raise AssertionError("a request that should be refused at the edge reached the engine")

    def models(self) -> tuple[Any, ...]:
        return ()

    def status(self) -> EngineStatus:
        return EngineStatus(state=self.state)


def call(
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    settings: Settings | None = None,
) -> tuple[int, dict[str, Any]]:
    """One request through the real app; returns (status, parsed JSON body)."""
    settings = settings or Settings()
    st = AppState(settings=settings, engine=UnreachableEngine())  # type: ignore[arg-type]
    st.api_keys = list(settings.security.api_keys)  # as the service sets them
    app = create_app(st)

    async def go() -> tuple[int, dict[str, Any]]:
        async with app.test_app():
            client = app.test_client()
            resp = await client.open(path, method=method, data=body, headers=headers or {})
            text = await resp.get_data(as_text=True)
            return resp.status_code, json.loads(text) if text else {}

    return asyncio.run(go())


def post(path: str, payload: Any, **kw: Any) -> tuple[int, dict[str, Any]]:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return call("POST", path, body=raw, headers=JSON_HEADERS, **kw)


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def chat(content: Any = "hi", **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], **extra}


def request_for(route: str, text: Any, **extra: Any) -> dict[str, Any]:
    return chat(text, **extra) if "chat" in route else {"input": text, **extra}


# -- nesting ---------------------------------------------------------------------------------
@pytest.mark.parametrize("route", ROUTES)
def test_deep_nesting_anywhere_in_a_body_is_400(route: str) -> None:
    """An extra field nested past the limit is a 400 nested_too_deeply, on both APIs."""
    status, body = post(route, request_for(route, "hi", extra=nested(MAX_DEPTH + 5)))
    assert status == 400, body
    assert body["error"]["code"] == "nested_too_deeply"
    assert body["error"]["param"].startswith("extra")


def test_deep_json_in_chat_tool_call_arguments_is_400() -> None:
    """A 50k-deep JSON *string* in an assistant tool call's arguments is refused (it used to
    reach json.loads in the prompt builder and end as a 500 RecursionError)."""
    deep = "[" * 50_000 + "]" * 50_000
    messages = [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "f", "arguments": deep},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "ok"},
    ]
    status, body = post("/v1/chat/completions", {"messages": messages})
    assert status == 400, body
    assert body["error"]["code"] == "nested_too_deeply"
    assert body["error"]["param"] == "messages[1].tool_calls[0].function.arguments"


def test_deep_json_in_function_call_item_arguments_is_400() -> None:
    """The same for a Responses ``function_call`` input item."""
    item = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{" * 20_000}
    status, body = post("/v1/responses", {"input": [item]})
    assert status == 400, body
    assert body["error"]["param"] == "input[0].arguments"


def test_flat_arguments_with_brackets_inside_strings_pass_the_depth_check() -> None:
    """Brackets inside JSON strings are not nesting: such arguments are not refused."""
    from mlxd.api.body import check_body, json_depth

    args = json.dumps({"text": "[" * 500})
    assert json_depth(args) == 1
    check_body({"arguments": args})  # does not raise


# -- unicode ---------------------------------------------------------------------------------
LONE = b'"\\ud800"'


@pytest.mark.parametrize(
    ("route", "raw", "param"),
    [
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": ' + LONE + b"}]}",
         "messages[0].content"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], '
         b'"user": ' + LONE + b"}", "user"),
        ("/v1/responses", b'{"input": ' + LONE + b"}", "input"),
        ("/v1/responses", b'{"input": "hi", "metadata": {"k": ' + LONE + b"}}", "metadata.k"),
        ("/v1/responses", b'{"input": "hi", "metadata": {' + LONE + b': "v"}}', "metadata.\ud800"),
        ("/v1/responses", b'{"input": "hi", "user": ' + LONE + b"}", "user"),
        ("/v1/responses", b'{"input": [{"type": "message", "role": "user", "id": "msg_\\udfff", '
         b'"content": "hi"}]}', "input[0].id"),
    ],
)  # fmt: skip
def test_lone_surrogates_are_400_wherever_they_are(route: str, raw: bytes, param: str) -> None:
    """A lone surrogate in content, input, metadata (key or value), user or an item id is a
    400 invalid_unicode naming the parameter: it would fail the tokenizer (500) or be stored
    and then break every archive sweep."""
    status, body = post(route, raw)
    assert status == 400, body
    assert body["error"]["code"] == "invalid_unicode"
    assert body["error"]["param"] == param


def test_surrogate_pairs_and_combining_marks_are_not_refused() -> None:
    """A proper surrogate pair (an emoji) with combining marks is ordinary text."""
    from mlxd.api.body import check_body

    check_body(json.loads('{"content": "\\ud83d\\ude00\\u0301\\u0302 \U0001f469\u200d\U0001f4bb"}'))


# -- size and headers ------------------------------------------------------------------------
def test_body_over_limit_is_413_after_the_body_was_read() -> None:
    """A declared length over server.max_body_bytes is 413 request_too_large; the body was
    drained, so the connection can stay open (no 'Connection: close')."""
    settings = Settings(server={"max_body_bytes": 4096})  # type: ignore[arg-type]
    app = create_app(AppState(settings=settings, engine=UnreachableEngine()))  # type: ignore[arg-type]
    raw = json.dumps(chat("a" * 10_000)).encode()

    async def go() -> tuple[int, dict[str, Any], str | None]:
        async with app.test_app():
            resp = await app.test_client().post(
                "/v1/chat/completions", data=raw, headers=JSON_HEADERS
            )
            return resp.status_code, await resp.get_json(), resp.headers.get("Connection")

    status, body, connection = asyncio.run(go())
    assert status == 413
    assert body["error"]["code"] == "request_too_large"
    assert connection != "close"


def test_too_many_headers_is_431() -> None:
    """More header lines than any client sends get 431, before the body is looked at."""
    headers = {f"x-h{i}": "v" for i in range(150)}
    status, body = call("GET", "/v1/models", headers=headers)
    assert status == 431
    assert body["error"]["code"] == "request_header_fields_too_large"
