"""The OpenAI Responses API: ``POST /v1/responses`` (JSON and SSE), retrieve, delete, input items.

A request's prompt is: the current request's ``instructions`` (as the system message; those of
earlier turns are not carried over, as the API defines), then for every stored ancestor of
``previous_response_id`` (root first) its input items and its output, then this request's
input items (:mod:`mlxd.conversations.items`). Stored turns live in
:mod:`mlxd.conversations.store`; wire shapes in :mod:`mlxd.api.responses_wire`.

This module is the Responses renderer and collector of :mod:`mlxd.api.pipeline`. Everything
that can be wrong with a request is found before the first byte is sent. A streaming client
that disconnects mid-stream cancels the generation and nothing is stored (the response id it
saw never becomes retrievable). While the engine is silent (a long prefill) the stream sends
``response.in_progress`` events, not SSE comments: Codex CLI and other agent clients reset
their idle timers only on events.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from quart import Blueprint, Response, jsonify, request

from ..conversations.items import build_messages, new_id, normalize_input
from ..conversations.store import Chain, Store, StoredResponse
from ..engine.loader import LoadedModel
from ..errors import BadRequest, MlxdError, NotFound
from . import pipeline, sse
from .context import AppState, RequestRecord, json_body, record, state
from .params import parse
from .pipeline import Done, Piece, Sampling
from .responses_wire import OutputEvent, OutputItems, ResponseHead, ResponsesRequest, status_of
from .routing import loaded_within, request_model, stream_when_loaded
from .tools import json_format

bp = Blueprint("responses", __name__)


@dataclass
class _Turn:
    """One turn being answered: its head, its chain pin and what to store at the end."""

    head: ResponseHead
    store: Store
    chain: Chain
    items: list[dict[str, Any]]
    output: OutputItems = field(default_factory=OutputItems)

    async def finish(self, done: Done) -> tuple[list[OutputEvent], dict[str, Any]]:
        """Close the output, store the turn (unless ``store: false``); the closing events
        and the final body. A storage error propagates: the caller reports it."""
        status = status_of(done)
        events = self.output.finish(status)
        body = self.head.body(status, self.output.items(status), done)
        if self.head.req.store:
            stored = StoredResponse(
                id=self.head.id,
                conversation_id=self.chain.conversation_id
                or f"conv_{self.head.id.removeprefix('resp_')}",
                previous_response_id=self.head.req.previous_response_id,
                created_at=time.time(),
                input_items=self.items,
                body=body,
            )
            await asyncio.to_thread(self.store.save, stored, self.head.model)
        return events, body


@dataclass
class _EventRenderer:
    """The renderer: typed Responses events with sequence numbers."""

    turn: _Turn
    seq: int = 0

    def _frame(self, kind: str, **payload: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.seq, **payload}
        self.seq += 1
        return sse.event_frame(data)

    def opening(self) -> list[bytes]:
        head = self.turn.head.body("in_progress", [])
        return [
            self._frame("response.created", response=head),
            self._frame("response.in_progress", response=head),
        ]

    def keepalive(self) -> bytes:
        return self._frame("response.in_progress", response=self.turn.head.body("in_progress", []))

    def piece(self, piece: Piece) -> list[bytes]:
        return [self._frame(kind, **payload) for kind, payload in self.turn.output.take(piece)]

    async def done(self, done: Done) -> list[bytes]:
        events, body = await self.turn.finish(done)
        frames = [self._frame(kind, **payload) for kind, payload in events]
        return [*frames, self._frame(f"response.{body['status']}", response=body)]

    def failed(self, error: MlxdError) -> list[bytes]:
        body = self.turn.head.body("failed", [], error=error)
        return [self._frame("response.failed", response=body)]

    def close(self) -> None:
        self.turn.store.end_turn(self.turn.chain)  # a dict update under the store's lock


# -- routes ----------------------------------------------------------------------------------
@bp.post("/v1/responses")
async def create_response() -> Response:
    st = state()
    rec = record()
    req = parse(ResponsesRequest, await json_body())
    items = normalize_input(req.input)
    load = request_model(st, rec, req.model, keep_alive=req.keep_alive)
    keepalive = st.settings.server.sse_keepalive_seconds
    if req.stream and not await loaded_within(load, min(keepalive, 2.0)):
        body = stream_when_loaded(
            load,
            rec,
            lambda lm: _stream_turn(st, rec, req, items, lm),
            keepalive,
            failed=_error_event,
        )
        return pipeline.sse_response(body)
    result = await _turn(st, rec, req, items, await load)
    if isinstance(result, dict):
        return jsonify(result)
    return pipeline.sse_response(result)


def _error_event(error: MlxdError) -> list[bytes]:
    """A stream that failed before its response existed (its model did not load)."""
    err = error.body()["error"]
    return [sse.event_frame({"type": "error", **err})]


async def _stream_turn(
    st: AppState,
    rec: RequestRecord,
    req: ResponsesRequest,
    items: list[dict[str, Any]],
    lm: LoadedModel,
) -> AsyncIterator[bytes]:
    result = await _turn(st, rec, req, items, lm)
    assert not isinstance(result, dict)  # req.stream is set
    return result


async def _turn(
    st: AppState,
    rec: RequestRecord,
    req: ResponsesRequest,
    items: list[dict[str, Any]],
    lm: LoadedModel,
) -> dict[str, Any] | AsyncIterator[bytes]:
    """Pin the chain, generate, store: the response body, or (streaming) its SSE events."""
    store = st.require_store()
    pin_seconds = st.settings.server.request_timeout_seconds + 60
    chain = await asyncio.to_thread(store.begin_turn, req.previous_response_id, None, pin_seconds)
    handed_over = False
    try:
        gen = await pipeline.start(
            st,
            rec,
            lm,
            build_messages(req.instructions, chain.history, items),
            tools=req.tools,
            tool_choice=req.tool_choice,
            parallel=req.parallel_tool_calls,
            fmt=json_format((req.text or {}).get("format"), param="text.format", flat=True),
            sampling=Sampling(
                requested_max=req.max_output_tokens,
                max_param="max_output_tokens",
                temperature=req.temperature,
                top_p=req.top_p,
                seed=req.seed,
                repetition_penalty=req.repetition_penalty,
                logprobs=req.logprobs_k(),
            ),
        )
        head = ResponseHead(new_id("resp"), int(time.time()), gen.model_id, req, gen.job.params)
        turn = _Turn(head, store, chain, items)
        if not req.stream:
            done = await pipeline.collect(gen, turn.output.take)
            _, body = await turn.finish(done)
            return body
        keepalive = st.settings.server.sse_keepalive_seconds
        await pipeline.wait_first(gen, min(keepalive, 2.0))
        body_stream = pipeline.stream(gen, _EventRenderer(turn), keepalive)
        handed_over = True  # the stream's renderer releases the pin
    finally:
        if not handed_over:
            store.end_turn(chain)  # a dict update under the store's lock: no disk access
    return body_stream


async def _stored(response_id: str) -> StoredResponse:
    found = await asyncio.to_thread(state().require_store().get, response_id)
    if found is None:
        raise NotFound(
            f"Response with id '{response_id}' not found.", param="response_id", code="not_found"
        )
    return found


@bp.get("/v1/responses/<response_id>")
async def retrieve_response(response_id: str) -> Response:
    return jsonify((await _stored(response_id)).body)


@bp.delete("/v1/responses/<response_id>")
async def delete_response(response_id: str) -> Response:
    if not await asyncio.to_thread(state().require_store().delete, response_id):
        raise NotFound(
            f"Response with id '{response_id}' not found.", param="response_id", code="not_found"
        )
    return jsonify({"id": response_id, "object": "response", "deleted": True})


@bp.get("/v1/responses/<response_id>/input_items")
async def list_input_items(response_id: str) -> Response:
    found = await _stored(response_id)
    args = request.args
    order: Literal["asc", "desc"] = "desc"
    if args.get("order", "desc") not in ("asc", "desc"):
        raise BadRequest("order must be 'asc' or 'desc'", param="order", code="invalid_value")
    order = "asc" if args.get("order") == "asc" else "desc"
    try:
        limit = int(args.get("limit", "20"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        raise BadRequest(
            "limit must be an integer from 1 to 100", param="limit", code="invalid_value"
        )
    data = list(found.input_items)
    if order == "desc":
        data.reverse()
    after = args.get("after")
    if after:
        ids = [item.get("id") for item in data]
        if after not in ids:
            raise BadRequest(
                f"no input item with id '{after}'", param="after", code="invalid_value"
            )
        data = data[ids.index(after) + 1 :]
    page = data[:limit]
    return jsonify(
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(data) > limit,
        }
    )
