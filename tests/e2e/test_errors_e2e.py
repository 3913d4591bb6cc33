"""Bad input gets a 4xx OpenAI error body, never a 500 (checked against the real daemon)."""

from __future__ import annotations

from typing import Any

import httpx2 as httpx
import openai
import pytest

from conftest import assert_openai_error

MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "messages"),
        ({"messages": "hello"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": MSG, "temperature": 5}, "temperature"),
        ({"messages": MSG, "max_tokens": -1}, "max_tokens"),
        ({"messages": MSG, "stop": 5}, "stop"),
        ({"messages": MSG, "stop": [1, 2]}, "stop"),
        ({"messages": MSG, "top_p": 0}, "top_p"),
        ({"messages": MSG, "n": 0}, "n"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, None),
        ({"messages": MSG, "max_tokens": 10_000_000}, "max_tokens"),
        (
            {"messages": [*MSG, {"role": "assistant", "tool_calls": [{"function": "x"}]}]},
            "messages[1].tool_calls",
        ),
        (
            {"messages": [*MSG, {"role": "assistant", "tool_calls": [{"id": "c"}]}]},
            "messages[1].tool_calls",
        ),
    ],
)
def test_invalid_requests_are_400(
    http: httpx.Client, body: dict[str, Any], param: str | None
) -> None:
    """Each malformed request is a 400 invalid_request_error naming the parameter."""
    err = assert_openai_error(http.post("/v1/chat/completions", json=body), 400)
    assert err["type"] == "invalid_request_error"
    if param:
        assert err["param"] == param


def test_invalid_json_is_400(http: httpx.Client) -> None:
    """A body that is not JSON is a 400, not a 500."""
    resp = http.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_openai_error(resp, 400)


def test_unknown_path_is_404(http: httpx.Client) -> None:
    """An unknown route is an OpenAI-shaped 404."""
    assert_openai_error(http.get("/v1/nothing-here"), 404)


def test_wrong_method_is_405(http: httpx.Client) -> None:
    """GET on a POST route is an OpenAI-shaped 405."""
    assert_openai_error(http.get("/v1/chat/completions"), 405)


def test_body_over_limit_is_413(http: httpx.Client) -> None:
    """A body above server.max_body_bytes (32 MiB default) is refused with 413."""
    big = b'{"messages": [{"role": "user", "content": "' + b"a" * (33 * 1024 * 1024) + b'"}]}'
    resp = http.post(
        "/v1/chat/completions", content=big, headers={"content-type": "application/json"}
    )
    assert_openai_error(resp, 413)


def test_unknown_fields_are_ignored(client: openai.OpenAI) -> None:
    """Fields mlxd does not know are ignored, as OpenAI clients expect."""
    resp = client.chat.completions.create(
        model="m", messages=MSG, max_tokens=3, extra_body={"frobnicate": True, "user": "x"}
    )
    assert resp.choices[0].message.content is not None


def test_sdk_raises_bad_request(client: openai.OpenAI) -> None:
    """The SDK maps our 400 to BadRequestError with the param."""
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="m", messages=MSG, temperature=5)
    assert err.value.param == "temperature"
