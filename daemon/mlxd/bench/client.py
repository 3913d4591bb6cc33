"""A streaming HTTP client (standard library only) that times what a server sends back.

One function per API the bench drives: ``stream_chat`` (Chat Completions, with
``stream_options.include_usage``) and ``stream_response`` (Responses, chained with
``previous_response_id``); both give a :class:`StreamResult` with the time to the first
generated text and token counts from the server's own usage.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .harness import HarnessError, Server


class BenchError(HarnessError):
    """The benchmark cannot go on; the message says which server and why."""


@dataclass
class StreamResult:
    """Timings of one streamed generation, seconds from just before the request was sent."""

    ttft: float  # first generated text (or the final chunk, if the text came only there)
    last: float  # the last chunk that carried text or the finish
    end: float  # the stream closed
    completion_tokens: int
    prompt_tokens: int
    cached_tokens: int | None
    text: str
    response_id: str | None = None
    started_at: float = 0.0  # perf_counter() at send, to line up concurrent streams

    @property
    def decode_tokens_per_s(self) -> float | None:
        span = self.last - self.ttft
        if self.completion_tokens < 2 or span <= 0:
            return None
        return (self.completion_tokens - 1) / span


class HttpStatusError(BenchError):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status


def sse_frames(resp: http.client.HTTPResponse) -> Iterator[tuple[str | None, str]]:
    """(event name, data) per SSE frame; comment lines (keepalives) are skipped."""
    event: str | None = None
    data: list[str] = []
    while True:
        raw = resp.readline()
        if not raw:
            break
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = None, []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield event, "\n".join(data)


def _post_stream(
    server: Server, path: str, body: dict[str, Any], timeout: float
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse, float]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    payload = json.dumps(body).encode()
    conn.connect()
    started = time.perf_counter()
    conn.request(
        "POST",
        path,
        body=payload,
        headers={
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
            **server.headers,
        },
    )
    resp = conn.getresponse()
    if resp.status != 200:
        text = resp.read().decode("utf-8", "replace")
        conn.close()
        raise HttpStatusError(resp.status, text)
    return conn, resp, started


def stream_chat(
    server: Server,
    messages: list[dict[str, str]],
    max_tokens: int,
    timeout: float,
    **extra: Any,
) -> StreamResult:
    """One streamed Chat Completion at temperature 0; token counts from the usage chunk.

    ``extra`` adds or overrides body fields; a None value leaves the field out (the server's
    default, e.g. ``temperature=None``).
    """
    body = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    } | extra
    body = {k: v for k, v in body.items() if v is not None}
    conn, resp, started = _post_stream(server, "/v1/chat/completions", body, timeout)
    first: float | None = None
    last = 0.0
    usage: dict[str, Any] | None = None
    text: list[str] = []
    try:
        for _, data in sse_frames(resp):
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise BenchError(f"stream failed: {chunk['error']}")
            now = time.perf_counter() - started
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") or {}
                piece = (delta.get("content") or "") + (
                    delta.get("reasoning_content") or delta.get("reasoning") or ""
                )
                text.append(delta.get("content") or "")
                if piece or choice.get("finish_reason"):
                    if first is None:
                        first = now
                    last = now
        end = time.perf_counter() - started
    finally:
        conn.close()
    if usage is None or first is None:
        raise BenchError("the stream ended without text or without a usage chunk")
    details = usage.get("prompt_tokens_details") or {}
    return StreamResult(
        ttft=first,
        last=last,
        end=end,
        completion_tokens=int(usage["completion_tokens"]),
        prompt_tokens=int(usage["prompt_tokens"]),
        cached_tokens=details.get("cached_tokens"),
        text="".join(text),
        started_at=started,
    )


def stream_response(
    server: Server, text: str, previous_id: str | None, max_tokens: int, timeout: float
) -> StreamResult:
    """One streamed ``POST /v1/responses`` turn chained with ``previous_response_id``."""
    body: dict[str, Any] = {
        "input": text,
        "max_output_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    if previous_id:
        body["previous_response_id"] = previous_id
    conn, resp, started = _post_stream(server, "/v1/responses", body, timeout)
    first: float | None = None
    last = 0.0
    final: dict[str, Any] | None = None
    response_id: str | None = None
    try:
        for _, data in sse_frames(resp):
            event = json.loads(data)
            kind = event.get("type", "")
            now = time.perf_counter() - started
            if kind == "response.created":
                response_id = event["response"]["id"]
            elif kind == "response.output_text.delta" and event.get("delta"):
                if first is None:
                    first = now
                last = now
            elif kind in ("response.completed", "response.incomplete"):
                final = event["response"]
                last = now
                first = now if first is None else first
            elif kind in ("response.failed", "error"):
                raise BenchError(f"response stream failed: {data[:300]}")
        end = time.perf_counter() - started
    finally:
        conn.close()
    if final is None or first is None or not final.get("usage"):
        raise BenchError("the response stream ended without a completed response")
    usage = final["usage"]
    out_text = "".join(
        part.get("text", "")
        for item in final.get("output") or ()
        for part in item.get("content") or ()
    )
    return StreamResult(
        ttft=first,
        last=last,
        end=end,
        completion_tokens=int(usage["output_tokens"]),
        prompt_tokens=int(usage["input_tokens"]),
        cached_tokens=(usage.get("input_tokens_details") or {}).get("cached_tokens"),
        text=out_text,
        response_id=response_id or final.get("id"),
        started_at=started,
    )
