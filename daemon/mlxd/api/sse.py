"""Server-sent events framing and the keep-alive wait shared by both streaming APIs."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from ..engine.core import Event, Failed, Finished, Job

KEEPALIVE = b": keepalive\n\n"


def data_frame(payload: Any) -> bytes:
    """A Chat Completions frame: ``data: <json>`` (no event line)."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def event_frame(payload: dict[str, Any]) -> bytes:
    """A Responses frame: ``event: <type>`` and ``data: <json>`` in one write."""
    body = json.dumps(payload, separators=(",", ":"))
    return f"event: {payload['type']}\ndata: {body}\n\n".encode()


DONE = b"data: [DONE]\n\n"


async def events_after(
    job: Job, first: Event | None, interval: float
) -> AsyncIterator[Event | None]:
    """``first`` (the event awaited before the stream started, if any), then the rest of the
    job's events with keep-alive gaps (see :func:`events_with_keepalive`)."""
    if first is not None:
        yield first
        if isinstance(first, Finished | Failed):
            return
    async for event in events_with_keepalive(job, interval):
        yield event


async def events_with_keepalive(job: Job, interval: float) -> AsyncIterator[Event | None]:
    """The job's events until Finished/Failed; ``None`` whenever ``interval`` passes with
    nothing new (the caller sends a keep-alive comment). Abandoning the iterator cancels the job.
    """
    try:
        while True:
            event = await job.next_event(interval)
            yield event
            if isinstance(event, Finished | Failed):
                return
    finally:
        job.cancel()
