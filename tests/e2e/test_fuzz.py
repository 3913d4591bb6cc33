"""Fuzzing the HTTP API of the real daemon with hypothesis: malformed and hostile requests.

Random JSON for every field of chat completions and responses (wrong types, huge numbers,
unicode, nested garbage), raw bodies that are not JSON or not UTF-8, wrong content types,
odd methods and paths, path traversal in ``/v1/models/{id}`` and ``/v1/responses/{id}``.
The contract: never a 5xx, every error is OpenAI-shaped, and the daemon still answers a real
completion afterwards. Budgets are fixed (``max_examples``, small ``max_tokens``) so the file
runs in well under a minute.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx2 as httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import Daemon

pytestmark = pytest.mark.e2e

FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- strategies ------------------------------------------------------------------------------
HUGE = st.sampled_from([2**31, 2**63, -(2**63), 10**100, -1, 0, 1e308, -1e308, 1e-308])
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    HUGE,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(
        [
            "",
            "\x00",
            "\ud800".encode("utf-8", "surrogatepass").decode("latin-1"),
            "💥" * 10,
            "../../etc/passwd",
            "<|im_start|>system",
            "{{ 7*7 }}",
        ]
    ),
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
ROLES = st.sampled_from(["system", "developer", "user", "assistant", "tool", "function"])
PART = st.one_of(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "input_text"]), "text": st.text(max_size=30)}
    ),
    st.fixed_dictionaries({"type": st.sampled_from(["image_url", "input_image", "refusal", "x"])}),
    JSON,
)
MESSAGE = st.one_of(
    st.fixed_dictionaries(
        {"role": ROLES, "content": st.one_of(st.text(max_size=60), st.lists(PART, max_size=3))},
        optional={
            "name": JSON,
            "tool_calls": JSON,
            "tool_call_id": JSON,
            "reasoning_content": JSON,
        },
    ),
    JSON,
)
# Garbage for a token budget, minus what would be valid and large: null (the server's default
# of 2048 tokens) or any number >= 1 would make a fuzz request generate for minutes.
BAD_MAX = JSON.filter(
    lambda v: (
        v is not None and not (isinstance(v, int | float) and not isinstance(v, bool) and v >= 1)
    )
)
SMALL_MAX = st.one_of(st.integers(1, 4), BAD_MAX)


def _field(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly plausible values, sometimes garbage of any JSON type."""
    return st.one_of(valid, valid, JSON)


CHAT_BODY = st.fixed_dictionaries(
    {
        "messages": st.one_of(st.lists(MESSAGE, min_size=1, max_size=3), JSON),
        "max_tokens": SMALL_MAX,
    },
    optional={
        "model": _field(st.text(max_size=20)),
        "temperature": _field(st.floats(-1, 3)),
        "top_p": _field(st.floats(-0.5, 1.5)),
        "seed": _field(st.integers()),
        "repetition_penalty": _field(st.floats(0, 20)),
        "stream": _field(st.booleans()),
        "stream_options": _field(st.fixed_dictionaries({"include_usage": st.booleans()})),
        "stop": _field(st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=20))),
        "n": _field(st.integers(0, 3)),
        "logprobs": _field(st.booleans()),
        "tools": JSON,
        "tool_choice": JSON,
        "response_format": _field(
            st.sampled_from([{"type": "json_object"}, {"type": "text"}, {"type": "json_schema"}])
        ),
        "max_completion_tokens": SMALL_MAX,
        "frobnicate": JSON,
    },
)
TOKEN_IDS = st.lists(st.integers(-5, 60_000), max_size=6)
COMPLETION_BODY = st.fixed_dictionaries(
    {
        "prompt": st.one_of(
            st.text(max_size=40),
            st.lists(st.text(max_size=20), max_size=3),
            TOKEN_IDS,
            st.lists(TOKEN_IDS, max_size=3),
            JSON,
        ),
        "max_tokens": SMALL_MAX,
    },
    optional={
        "n": _field(st.integers(0, 3)),
        "echo": _field(st.booleans()),
        "logprobs": _field(st.integers(-1, 6)),
        "stream": _field(st.booleans()),
        "stop": _field(st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5)))),
        "temperature": _field(st.floats(-1, 3)),
        "best_of": JSON,
        "suffix": JSON,
    },
)
EMBEDDING_BODY = st.fixed_dictionaries(
    {
        "input": st.one_of(
            st.text(max_size=40),
            st.lists(st.text(max_size=20), max_size=4),
            TOKEN_IDS,
            st.lists(TOKEN_IDS, max_size=3),
            JSON,
        )
    },
    optional={
        "encoding_format": _field(st.sampled_from(["float", "base64"])),
        "dimensions": _field(st.integers(-2, 1000)),
        "model": JSON,
    },
)
INPUT_ITEM = st.one_of(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "assistant", "system", "developer", "wizard"]),
            "content": st.one_of(st.text(max_size=40), st.lists(PART, max_size=2)),
        },
        optional={
            "type": st.sampled_from(
                ["message", "function_call", "function_call_output", "reasoning", "bogus"]
            )
        },
    ),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["function_call", "function_call_output"])},
        optional={"call_id": JSON, "name": JSON, "arguments": JSON, "output": JSON},
    ),
    JSON,
)
RESPONSES_BODY = st.fixed_dictionaries(
    {
        "input": st.one_of(st.text(max_size=60), st.lists(INPUT_ITEM, max_size=3), JSON),
        "max_output_tokens": SMALL_MAX,
    },
    optional={
        "instructions": _field(st.text(max_size=40)),
        "previous_response_id": _field(
            st.sampled_from(["resp_nope", "../../etc/passwd", "", "resp_\x00", "%2e%2e"])
        ),
        "store": _field(st.booleans()),
        "metadata": _field(
            st.dictionaries(st.text(max_size=70), st.text(max_size=600), max_size=20)
        ),
        "temperature": _field(st.floats(-1, 3)),
        "stream": _field(st.booleans()),
        "tools": JSON,
        "tool_choice": JSON,
        "text": JSON,
        "truncation": JSON,
        "model": JSON,
    },
)
HOSTILE_IDS = st.one_of(
    st.sampled_from(
        [
            "../../../etc/passwd",
            "..%2f..%2f..%2fetc%2fpasswd",
            "%2e%2e%2f%2e%2e%2fconversations.sqlite3",
            "..\\..\\windows",
            "resp_%00",
            "a" * 5000,
            "resp_' OR '1'='1",
            "%F0%9F%92%A5",
            "%ff%fe",
            "SmolLM2-135M-Instruct/../../x",
        ]
    ),
    st.text(
        alphabet=st.characters(codec="ascii", exclude_characters="#?/\\ \x7f", min_codepoint=33),
        min_size=1,
        max_size=60,
    ),
)
METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE"])
PATHS = st.one_of(
    st.sampled_from(
        [
            "/",
            "/health",
            "/metrics",
            "/v1",
            "/v1/models",
            "/v1/chat/completions",
            "/v1/responses",
            "/v1/completions",
            "/v1/embeddings",
            "//v1//models",
            "/v1/models/",
            "/v1/responses/",
            "/static/../../etc/passwd",
        ]
    ),
    HOSTILE_IDS.map(lambda s: f"/v1/models/{s}"),
    HOSTILE_IDS.map(lambda s: f"/v1/responses/{s}"),
    HOSTILE_IDS.map(lambda s: f"/v1/responses/{s}/input_items?limit={s[:5]}&order={s[:5]}"),
    HOSTILE_IDS.map(lambda s: f"/{s}"),
)
CONTENT_TYPES = st.sampled_from(
    [
        None,
        "application/json",
        "application/json; charset=latin-1",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=xyz",
        "application/octet-stream",
        "😀/😀",
    ]
)


# -- checks ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def api(shared_daemon: Daemon) -> Iterator[httpx.Client]:
    with shared_daemon.http(timeout=60) as client:
        yield client


def assert_sane(resp: httpx.Response, method: str = "POST") -> None:
    """No 5xx; every error is an OpenAI error object; successful bodies parse."""
    assert resp.status_code < 500, f"{resp.status_code}: {resp.text[:500]}"
    if method == "HEAD" or resp.status_code == 204:
        return
    if resp.status_code >= 400:
        err = resp.json()["error"]
        assert set(err) >= {"message", "type", "param", "code"}, err
        assert isinstance(err["message"], str) and err["message"]
        assert isinstance(err["type"], str)
    elif resp.headers.get("content-type", "").startswith("application/json"):
        resp.json()


def post_json(api: httpx.Client, path: str, body: dict[str, Any]) -> None:
    """POST ``body`` (streaming or not) and check the answer; stream frames must parse."""
    content = json.dumps(body).encode()  # NaN/Infinity included: Python's json accepts them
    headers = {"content-type": "application/json"}
    with api.stream("POST", path, content=content, headers=headers) as resp:
        if resp.headers.get("content-type", "").startswith("text/event-stream"):
            assert resp.status_code == 200
            frames = [ln[6:] for ln in resp.iter_lines() if ln.startswith("data: ")]
            assert frames, "an empty stream"
            for frame in frames:
                if frame != "[DONE]":
                    payload = json.loads(frame)
                    if "error" in payload and isinstance(payload["error"], dict):
                        assert payload["error"].get("code") != "internal_error", payload
            return
        resp.read()
        assert_sane(resp)


# -- tests -----------------------------------------------------------------------------------
@settings(FUZZ, max_examples=30)
@given(body=CHAT_BODY)
def test_fuzz_chat_completions(api: httpx.Client, body: dict[str, Any]) -> None:
    """Random and hostile chat completion bodies never cause a 5xx or a malformed error."""
    post_json(api, "/v1/chat/completions", body)


@settings(FUZZ, max_examples=25)
@given(body=RESPONSES_BODY)
def test_fuzz_responses(api: httpx.Client, body: dict[str, Any]) -> None:
    """Random and hostile Responses bodies never cause a 5xx or a malformed error."""
    post_json(api, "/v1/responses", body)


@settings(FUZZ, max_examples=25)
@given(body=COMPLETION_BODY)
def test_fuzz_completions(api: httpx.Client, body: dict[str, Any]) -> None:
    """Random and hostile legacy completion bodies never cause a 5xx or a malformed error."""
    post_json(api, "/v1/completions", body)


@settings(FUZZ, max_examples=25)
@given(body=EMBEDDING_BODY)
def test_fuzz_embeddings(api: httpx.Client, body: dict[str, Any]) -> None:
    """Random and hostile embedding bodies never cause a 5xx or a malformed error."""
    post_json(api, "/v1/embeddings", body)


@settings(FUZZ, max_examples=40)
@given(
    body=st.one_of(
        st.binary(max_size=300),
        st.sampled_from(
            [
                b"\xff\xfe\x00{",
                b'{"messages": [{"role": "user", "content": "\xc3\x28"}]}',
                b'{"messages": "\xed\xa0\x80"}',
                b"[" * 3000 + b"]" * 3000,
                b'{"a":' * 3000 + b"1" + b"}" * 3000,
                b"null",
                b"1e999999",
                b'"just a string"',
                b"",
            ]
        ),
        JSON.map(lambda v: json.dumps(v).encode()),
    ),
    content_type=CONTENT_TYPES,
    path=st.sampled_from(["/v1/chat/completions", "/v1/responses"]),
)
def test_fuzz_raw_bodies(
    api: httpx.Client, body: bytes, content_type: str | None, path: str
) -> None:
    """Bodies that are not JSON objects, not UTF-8 or deeply nested, under any content type,
    are 4xx OpenAI errors."""
    headers = {"content-type": content_type.encode()} if content_type else {}
    resp = api.post(path, content=body, headers=headers)
    if resp.status_code == 200:  # a random JSON that happens to be a valid request
        return
    assert_sane(resp)
    assert 400 <= resp.status_code < 500


@settings(FUZZ, max_examples=60)
@given(method=METHODS, path=PATHS)
@example(method="GET", path="/v1/models/.")  # found by this test: a dot segment
def test_fuzz_methods_and_paths(api: httpx.Client, method: str, path: str) -> None:
    """Odd methods and hostile paths (traversal, encoded bytes, huge ids) get a 2xx or an
    OpenAI-shaped 4xx, and nothing outside the API is ever served."""
    resp = api.request(method, path)
    assert_sane(resp, method)
    assert "root:" not in resp.text  # /etc/passwd never leaks
    # The path as sent: the client resolves dot segments ("/v1/models/." goes out as
    # "/v1/models", the list), so the server is judged on what it was asked.
    sent = resp.request.url.raw_path.decode("ascii").split("?")[0]
    if sent.startswith(("/v1/models/", "/v1/responses/")) and sent.count("/") >= 3:
        is_real_model = sent == "/v1/models/SmolLM2-135M-Instruct"
        if not is_real_model and method in ("GET", "DELETE"):
            assert resp.status_code in (400, 404, 405), resp.text[:300]


# -- unicode, seeds and nesting on every route ------------------------------------------------
UNICODE = st.one_of(
    st.sampled_from(
        [
            "\ud800",  # lone high surrogate
            "\udfff tail",  # lone low surrogate
            "\ud83d\ude00",  # a pair as two code units: still lone surrogates in Python
            "\U0001f600\u0301\u0302\u0303" * 3,  # 4-byte emoji with combining marks
            "\U0001f469\u200d\U0001f4bb\u20dd",  # ZWJ sequence, enclosing mark
            "e" + "\u0301" * 40,  # a run of combining marks (short: prompts stay small)
            "\ufeff\u202e\u2066rtl\u2069",  # BOM, bidi overrides
            "\ufffe\uffff\U0010ffff",  # noncharacters
            "\x00\x1b[31m",  # NUL, terminal escape
            "\ue000\U000f0000",  # private use
        ]
    ),
    st.text(
        alphabet=st.characters(codec=None, categories=["Cs", "Mn", "So", "Cf", "Co"]),
        min_size=1,
        max_size=12,
    ),
)
SEEDS = st.one_of(HUGE, st.integers(-(2**70), 2**70), st.sampled_from([-1, 2**64 - 1, 2**64]))


def _deep(depth: int, leaf: Any) -> Any:
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


NESTED = st.builds(_deep, st.integers(50, 400), SCALARS)
DEEP_ARGUMENTS = st.integers(50, 5000).map(lambda n: "[" * n + "]" * n)


def _chat_body(text: Any, seed: Any, extra: Any, arguments: Any) -> dict[str, Any]:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}
    return {
        "messages": [
            {"role": "user", "content": text},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": text},
        ],
        "max_tokens": 2,
        "seed": seed,
        "user": text,
        "extra": extra,
    }


def _responses_body(text: Any, seed: Any, extra: Any, arguments: Any) -> dict[str, Any]:
    return {
        "input": [
            {"type": "message", "role": "user", "content": text, "id": f"msg_{text}"},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": arguments},
            {"type": "function_call_output", "call_id": "c1", "output": text},
        ],
        "max_output_tokens": 2,
        "seed": seed,
        "metadata": {"k": text, text[:64]: "v"},
        "user": text,
        "extra": extra,
    }


def _messages_body(text: Any, seed: Any, extra: Any, arguments: Any) -> dict[str, Any]:
    return {
        "model": "m",
        "max_tokens": 2,
        "system": text,
        "messages": [
            {"role": "user", "content": text},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f",
                                               "input": {"x": extra, "arguments": arguments}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": text}]},
        ],
        "metadata": {"user_id": text},
    }  # fmt: skip


def _completions_body(text: Any, seed: Any, extra: Any, arguments: Any) -> dict[str, Any]:
    return {"prompt": [text], "max_tokens": 2, "seed": seed, "user": text, "extra": extra,
            "arguments": arguments}  # fmt: skip


def _embeddings_body(text: Any, seed: Any, extra: Any, arguments: Any) -> dict[str, Any]:
    return {"input": [text], "user": text, "extra": extra, "arguments": arguments}


ROUTE_BODIES = {
    "/v1/completions": _completions_body,
    "/v1/embeddings": _embeddings_body,
    "/v1/chat/completions": _chat_body,
    "/v1/responses": _responses_body,
    "/v1/messages": _messages_body,
    "/v1/messages/count_tokens": _messages_body,
}


def assert_sane_any(resp: httpx.Response, path: str) -> None:
    """No 5xx; errors in the shape of the route's API (Anthropic's on /v1/messages)."""
    if not path.startswith("/v1/messages"):
        assert_sane(resp)
        return
    assert resp.status_code < 500, f"{resp.status_code}: {resp.text[:500]}"
    if resp.status_code >= 400:
        body = resp.json()
        assert body["type"] == "error" and body["error"]["message"], body


@settings(FUZZ, max_examples=40)
@given(
    path=st.sampled_from(sorted(ROUTE_BODIES)),
    text=UNICODE,
    seed=st.one_of(st.none(), SEEDS),
    extra=st.one_of(st.none(), NESTED),
    arguments=st.one_of(st.just("{}"), DEEP_ARGUMENTS, UNICODE),
    stream=st.booleans(),
)
def test_fuzz_unicode_seeds_and_nesting_on_every_route(
    api: httpx.Client, path: str, text: str, seed: Any, extra: Any, arguments: Any, stream: bool
) -> None:
    """Lone surrogates, combining marks and other unicode edge cases, seeds of any size and
    bodies nested hundreds deep (in any field and inside tool-call arguments) get a clear 4xx
    or a normal answer on every generating route, streaming or not; never a 5xx."""
    body = ROUTE_BODIES[path](text, seed, extra, arguments)
    if stream and "count_tokens" not in path and "embeddings" not in path:
        body["stream"] = True
    content = json.dumps(body).encode()  # lone surrogates travel as \ud800 escapes
    headers = {"content-type": "application/json"}
    with api.stream("POST", path, content=content, headers=headers) as resp:
        resp.read()
    if resp.headers.get("content-type", "").startswith("text/event-stream"):
        assert resp.status_code == 200
        assert "internal_error" not in resp.text and "api_error" not in resp.text, resp.text[-500:]
        return
    assert_sane_any(resp, path)


@settings(FUZZ, max_examples=30)
@given(
    method=st.sampled_from(["GET", "DELETE"]),
    raw=st.sampled_from(["%ED%A0%80", "%F0%9F%98%80%CC%81", "%C0%AF", "%EF%BF%BE", "\u00e9"]),
    where=st.sampled_from(["/v1/models/{}", "/v1/responses/{}", "/v1/responses/{}/input_items",
                           "/v1/responses/r/input_items?after={}&order={}"]),
)  # fmt: skip
def test_fuzz_unicode_in_paths_and_queries(
    api: httpx.Client, method: str, raw: str, where: str
) -> None:
    """Ids and query values holding encoded surrogates, overlong UTF-8 or noncharacters are
    4xx OpenAI errors."""
    resp = api.request(method, where.replace("{}", raw))
    assert_sane(resp, method)
    assert 400 <= resp.status_code < 500 or resp.status_code == 200, resp.text[:300]


def test_daemon_still_serves_after_fuzzing(shared_daemon: Daemon) -> None:
    """After the fuzz runs, /health is ok and a real completion succeeds."""
    with shared_daemon.http() as http:
        assert http.get("/health").json()["status"] == "ok"
    resp = shared_daemon.client().chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=8,
    )
    assert "Paris" in (resp.choices[0].message.content or "")
