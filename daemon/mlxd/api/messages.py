"""The Anthropic Messages API: ``POST /v1/messages`` (JSON and SSE) and ``count_tokens``.

For Claude Code and Anthropic SDK apps (wire shapes: ``shared/ANTHROPIC_WIRE.md``). The
request becomes the same chat messages and tools as the OpenAI APIs, so everything after
that is :mod:`mlxd.api.pipeline`; this module is its Anthropic renderer and collector. Errors
on these routes are Anthropic-shaped (``{"type": "error", "error": {type, message}}``, see
:meth:`mlxd.errors.MlxdError.anthropic`).

Mapping decisions a client may notice:

* ``usage.input_tokens`` counts the prompt tokens that were *not* read from the prompt cache;
  ``cache_read_input_tokens`` the ones that were (their sum is the prompt, as Anthropic
  defines it; ``count_tokens`` returns that sum). ``cache_control`` is accepted and ignored:
  mlxd reuses every prefix it can on its own.
* Claude Code puts an ``x-anthropic-billing-header: …`` line, different on every request, at
  the top of its system prompt; that line is dropped before templating, so consecutive turns
  share their prefix.
* ``thinking`` maps onto the model's reasoning: ``enabled`` returns ``<think>`` text as
  thinking blocks (with an opaque signature); ``disabled`` drops it; absent follows
  ``[model] reasoning``. ``budget_tokens`` is checked (≥ 1024 and below ``max_tokens``) but the
  model's thinking is not cut at it. Thinking blocks from earlier turns are not shown to the
  model again (as Anthropic's own models discard them).
* ``top_k`` is applied; ``metadata`` and ``anthropic-beta`` are accepted and ignored.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from quart import Blueprint, Response, jsonify

from ..engine.loader import LoadedModel
from . import pipeline, sse
from .context import AppState, RequestRecord, json_body, record, state
from .messages_wire import (
    ContentBlocks,
    CountTokensRequest,
    EventRenderer,
    MessageHead,
    MessagesRequest,
    chat_messages,
    openai_tools,
    reasoning_mode,
)
from .params import parse
from .pipeline import Sampling
from .routing import loaded_within, model_for, request_model, stream_when_loaded

bp = Blueprint("messages", __name__)


# -- routes ----------------------------------------------------------------------------------
@bp.post("/v1/messages")
async def create_message() -> Response:
    st = state()
    rec = record()
    req = parse(MessagesRequest, await json_body())
    load = request_model(st, rec, req.model)
    keepalive = st.settings.server.sse_keepalive_seconds
    if req.stream and not await loaded_within(load, min(keepalive, 2.0)):
        # Claude Code's default model names reach a model through aliases, often a cold one:
        # pings while it loads, then the stream.
        body = stream_when_loaded(
            load,
            rec,
            lambda lm: _stream(st, rec, req, lm),
            keepalive,
            keepalive=sse.event_frame({"type": "ping"}),
            failed=lambda error: [sse.event_frame(error.anthropic()[1])],
        )
        return pipeline.sse_response(body)
    lm = await load
    if req.stream:
        return pipeline.sse_response(await _stream(st, rec, req, lm))
    gen = await _start(st, rec, req, lm)
    head = MessageHead(f"msg_{uuid.uuid4().hex[:24]}", gen.model_id)
    blocks = ContentBlocks()
    done = await pipeline.collect(gen, blocks.take)
    return jsonify(head.message(blocks.content(), done, rec.prompt_tokens or 0))


async def _start(
    st: AppState, rec: RequestRecord, req: MessagesRequest, lm: LoadedModel
) -> pipeline.Generation:
    tools, choice, parallel = openai_tools(req)
    return await pipeline.start(
        st,
        rec,
        lm,
        chat_messages(req),
        tools=tools,
        tool_choice=choice,
        parallel=parallel,
        fmt=None,
        sampling=Sampling(
            requested_max=req.max_tokens,
            max_param="max_tokens",
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            seed=None,
            repetition_penalty=None,
            stop=tuple(req.stop_sequences or ()),
        ),
        reasoning=reasoning_mode(req),
    )


async def _stream(
    st: AppState, rec: RequestRecord, req: MessagesRequest, lm: LoadedModel
) -> AsyncIterator[bytes]:
    """Start the generation and return its SSE events (errors before the first raise)."""
    gen = await _start(st, rec, req, lm)
    head = MessageHead(f"msg_{uuid.uuid4().hex[:24]}", gen.model_id)
    keepalive = st.settings.server.sse_keepalive_seconds
    await pipeline.wait_first(gen, min(keepalive, 2.0))
    renderer = EventRenderer(head, rec.prompt_tokens or 0)
    return pipeline.stream(gen, renderer, keepalive)


@bp.post("/v1/messages/count_tokens")
async def count_tokens() -> Response:
    """The prompt's token count, exactly as ``/v1/messages`` would build the prompt."""
    st = state()
    req = parse(CountTokensRequest, await json_body())
    rec = record()
    lm = await model_for(st, rec, req.model)
    tools, choice, parallel = openai_tools(req)
    rendered = await pipeline.render(
        lm, chat_messages(req), tools=tools, tool_choice=choice, parallel=parallel, fmt=None
    )
    rec.prompt_tokens = len(rendered.prompt.ids)
    return jsonify({"input_tokens": len(rendered.prompt.ids)})
