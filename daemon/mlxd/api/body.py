"""What a request body may hold, checked once at the edge before any route sees it.

Each check closes a family of inputs that used to fail deep inside (a 500, a hung request,
or a record the archive could never write):

* **Nesting** deeper than :data:`MAX_DEPTH` anywhere in the body, *and* inside the JSON
  strings that are parsed later (tool-call ``arguments`` of assistant messages and
  ``function_call`` items): Python's recursive parsers and renderers would raise
  ``RecursionError``. 400 ``nested_too_deeply``.
* **Size**: a body over ``server.max_body_bytes`` gets 413 ``request_too_large``, but only
  after it has been read and discarded (up to :func:`discard_limit`), so the client is
  listening when the answer comes, instead of seeing a broken pipe (nginx does the same).
  A body that stops arriving gets 408 after ``server.body_timeout_seconds``.
* **Headers**: more than :data:`MAX_HEADERS` header lines get 431.
* **Lone surrogates** (``"\\ud800"`` is valid JSON but not Unicode text): they cannot be
  encoded as UTF-8, so the tokenizer, the store and the archive would fail on them.
  400 ``invalid_unicode``, naming the parameter.

The walk is iterative (no recursion, whatever the depth) and linear in the body's size.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from quart import request

from ..errors import BadRequest, MlxdError, PayloadTooLarge

#: Deepest nesting of arrays/objects accepted, in the body and in embedded JSON strings.
#: Real tool schemas and arguments stay far below; Python's recursion limit (1000 frames,
#: several per level in pydantic, jinja and json) is what it protects.
MAX_DEPTH = 64
#: Keys whose string values are JSON that mlxd parses (tool-call arguments).
_EMBEDDED_JSON_KEYS = frozenset({"arguments"})
_SURROGATE = re.compile("[\ud800-\udfff]")
#: Most header lines in one request (hypercorn bounds their total size at 16 KiB).
MAX_HEADERS = 100


def discard_limit(max_body_bytes: int) -> int:
    """How much of an oversized body is read (and dropped) before answering 413."""
    return max(2 * max_body_bytes, 64 * 1024 * 1024)


def check_headers() -> None:
    """431 when the request carries more header lines than any real client sends."""
    if len(request.headers) > MAX_HEADERS:
        err = MlxdError(
            f"the request has {len(request.headers)} header lines; at most {MAX_HEADERS} "
            "are accepted",
            code="request_header_fields_too_large",
        )
        err.status, err.type = 431, "invalid_request_error"
        raise err


async def refuse_oversized(max_body_bytes: int, timeout: float) -> None:
    """413 for a declared Content-Length over the limit, after draining the body."""
    length = request.content_length
    if length is None or length <= max_body_bytes:
        return
    await _drain(discard_limit(max_body_bytes), timeout)
    raise PayloadTooLarge(
        f"request body of {length} bytes exceeds server.max_body_bytes ({max_body_bytes})"
    )


async def read_limited(max_body_bytes: int, timeout: float) -> bytes:
    """The whole body, or 413 once it grows past the limit (chunked bodies have no length),
    or 408 when it has not fully arrived after ``timeout`` seconds."""
    data = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.body:
                data += chunk
                if len(data) > max_body_bytes:
                    break
    except TimeoutError:
        raise _body_timeout(timeout) from None
    if len(data) > max_body_bytes:
        await _drain(discard_limit(max_body_bytes) - len(data), timeout)
        raise PayloadTooLarge(f"request body exceeds server.max_body_bytes ({max_body_bytes})")
    return bytes(data)


async def _drain(budget: int, timeout: float) -> None:
    """Read and drop up to ``budget`` more bytes; past it, the answer goes out anyway and the
    connection is closed (after_request says ``Connection: close``)."""
    seen = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.body:
                seen += len(chunk)
                if seen >= budget:
                    return
    except TimeoutError:
        return


def _body_timeout(timeout: float) -> MlxdError:
    err = MlxdError(
        f"the request body did not arrive within {timeout:g} s (server.body_timeout_seconds)",
        code="request_timeout",
    )
    err.status, err.type = 408, "invalid_request_error"
    return err


def check_body(data: Any) -> None:
    """Raise a 400 if ``data`` (a parsed JSON body) nests too deeply or holds lone surrogates."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        node, where, depth = stack.pop()
        if isinstance(node, str):
            _check_text(node, where)
            if where.rsplit(".", 1)[-1] in _EMBEDDED_JSON_KEYS:
                _check_embedded(node, where, depth)
            continue
        if not isinstance(node, dict | list):
            continue
        if depth >= MAX_DEPTH:
            raise _too_deep(where)
        if isinstance(node, dict):
            for key, value in node.items():
                path = f"{where}.{key}" if where else str(key)
                _check_text(key, path)
                stack.append((value, path, depth + 1))
        else:
            stack.extend((value, f"{where}[{i}]", depth + 1) for i, value in enumerate(node))


def json_depth(text: str) -> int:
    """The deepest bracket nesting of ``text`` read as JSON (brackets inside strings ignored).

    A linear scan, not a parse: cheap enough for a 30 MB string and never recursive.
    """
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _check_text(text: str, where: str) -> None:
    if _SURROGATE.search(text) is not None:
        raise BadRequest(
            f"'{where or 'body'}' holds a lone UTF-16 surrogate (like \\ud800), which is not "
            "Unicode text. Hint: send characters outside the BMP as a surrogate pair or as UTF-8.",
            param=where or None,
            code="invalid_unicode",
        )


def _check_embedded(text: str, where: str, depth: int) -> None:
    # Only the bracket count matters; quick exit for the usual short, flat arguments.
    if text.count("[") + text.count("{") < MAX_DEPTH - depth:
        return
    if depth + json_depth(text) > MAX_DEPTH:
        raise _too_deep(where)


def _too_deep(where: str) -> BadRequest:
    return BadRequest(
        f"'{where or 'body'}' is nested too deeply (more than {MAX_DEPTH} levels of arrays "
        "and objects)",
        param=where or None,
        code="nested_too_deeply",
    )
