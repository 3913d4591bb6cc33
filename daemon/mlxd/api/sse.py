"""Server-sent events framing (the stream loop itself is :func:`mlxd.api.pipeline.stream`)."""

from __future__ import annotations

import json
from typing import Any

KEEPALIVE = b": keepalive\n\n"


def data_frame(payload: Any) -> bytes:
    """A Chat Completions frame: ``data: <json>`` (no event line)."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def event_frame(payload: dict[str, Any]) -> bytes:
    """A typed frame (Responses, Anthropic Messages): ``event: <type>`` and ``data: <json>``."""
    body = json.dumps(payload, separators=(",", ":"))
    return f"event: {payload['type']}\ndata: {body}\n\n".encode()


DONE = b"data: [DONE]\n\n"
