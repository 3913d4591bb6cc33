"""The one generation pipeline every API uses: request → job → typed output → wire.

An API route validates its own request shape and builds chat messages; from there the path is
the same for all of them:

1. :func:`start` plans tools and output format, builds the prompt, checks the limits and
   submits the job to the engine (every 4xx/503 is raised here, before any byte is sent).
   :func:`start_choices` does the same for ``n`` choices and :func:`start_raw` for token
   ids without a chat template (legacy completions); both return a :class:`Group`.
2. :func:`pieces` turns the engine's events into typed output pieces — :class:`Reasoning`,
   :class:`~mlxd.api.tools.Text`, :class:`~mlxd.api.tools.CallStarted`,
   :class:`~mlxd.api.tools.CallArguments`, :class:`~mlxd.api.logprobs.Logprobs` (when asked
   for; just before the text of the same tokens) — then one :class:`Done` (finish reason,
   usage, the calls read); a failure raises its :class:`~mlxd.errors.MlxdError`. A
   :class:`Group` merges several generations' pieces as :class:`Choice` items.
3. Either :func:`collect` (non-streaming: a collector function takes each piece) or
   :func:`stream` (SSE: a :class:`Renderer` turns each piece into frames).

:func:`stream` is the only stream loop: keep-alives while the engine is silent, first-token
time, the failure frame, 499 on disconnect, cancelling the job, and the request's one
``request.completed`` record all live here. A new API is one renderer and one collector.

One piece: start, pieces, Group, collect and stream are the one path every request follows,
read top to bottom; split up, the stream loop and the sources it drives would bounce between
files.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

from quart import Response

from ..engine.constrain import GrammarProcessor
from ..engine.core import (
    Delta,
    Event,
    Failed,
    Finished,
    GenerationParams,
    GenerationRequest,
    JobHandle,
)
from ..engine.loader import LoadedModel
from ..errors import MlxdError
from ..logs import get_logger
from ..prompt import Prompt, build_prompt
from .context import AppState, RequestRecord
from .logprobs import Logprobs, TokenText
from .params import generation_params
from .routing import entry_for
from .tools import Call, CallArguments, CallStarted, JsonFormat, OutputPlan, Text, plan_output

log = get_logger("mlxd.api")

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
T_contra = TypeVar("T_contra", contravariant=True)


@dataclass(frozen=True)
class Sampling:
    """The request's generation fields, named the same in every API."""

    requested_max: int | None
    max_param: str
    temperature: float | None
    top_p: float | None
    seed: int | None
    repetition_penalty: float | None
    stop: tuple[str, ...] = ()
    top_k: int | None = None
    #: None: no logprobs; k: each token's logprob and its k most likely alternatives.
    logprobs: int | None = None


@dataclass(frozen=True)
class Reasoning:
    """Reasoning (``<think>``) text, separated from the answer."""

    text: str


Piece = Reasoning | Text | CallStarted | CallArguments | Logprobs


@dataclass(frozen=True)
class Done:
    """The end of a generation: the engine's counts and the tool calls that were read."""

    finished: Finished
    calls: tuple[Call, ...]

    @property
    def finish_reason(self) -> str:
        """``tool_calls`` when the model called tools and was not cut off; else the engine's."""
        if self.calls and self.finished.finish_reason == "stop":
            return "tool_calls"
        return self.finished.finish_reason


class Source(Protocol[T_co]):
    """What :func:`collect` and :func:`stream` drive: a :class:`Generation` (its pieces) or
    a :class:`Group` (:class:`Choice` items)."""

    record: RequestRecord

    def items(self, interval: float | None) -> AsyncIterator[T_co | Done | None]:
        """The output, then one :class:`Done`; ``None`` for each silent ``interval``."""

    def cancel(self) -> None:
        """Stop every job (idempotent)."""


@dataclass
class Generation(Source[Piece]):
    """A submitted job, its output plan, and the request it belongs to."""

    job: JobHandle
    plan: OutputPlan
    record: RequestRecord
    model_id: str
    first: Event | None = None  # awaited before a stream started (see wait_first)

    @property
    def max_tokens(self) -> int:
        return self.job.params.max_tokens

    def items(self, interval: float | None) -> AsyncIterator[Piece | Done | None]:
        return pieces(self, interval)

    def cancel(self) -> None:
        self.job.cancel()


@dataclass(frozen=True)
class Choice:
    """One item of choice ``index`` of a :class:`Group`: a piece, or that choice's end."""

    index: int
    item: Piece | Done


@dataclass
class Group(Source[Choice]):
    """Several generations answered as one response (``n`` choices, several prompts).

    Choice ``i`` is ``gens[i]``; ``n`` consecutive choices share a prompt. Its items are
    every choice's pieces and ends as :class:`Choice` items, in the order they are made,
    then one :class:`Done` whose counts cover all of them (each prompt counted once).
    """

    gens: list[Generation]
    record: RequestRecord
    model_id: str
    n: int = 1

    async def items(self, interval: float | None) -> AsyncIterator[Choice | Done | None]:
        if len(self.gens) == 1:  # the usual request: no pump task and queue hop per token
            async for one in pieces(self.gens[0], interval):
                if one is None:
                    yield None
                    continue
                yield Choice(0, one)
                if isinstance(one, Done):
                    yield self._total([one])
                    return
            return
        queue: asyncio.Queue[tuple[int, Piece | Done | BaseException]] = asyncio.Queue()

        async def pump(i: int, gen: Generation) -> None:
            try:
                async for item in pieces(gen, None):
                    if item is not None:
                        queue.put_nowait((i, item))
            except Exception as exc:  # handed to the reader, which raises it
                queue.put_nowait((i, exc))

        pumps = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(self.gens)]
        ends: list[Done | None] = [None] * len(self.gens)
        try:
            while any(end is None for end in ends):
                try:
                    i, item = await asyncio.wait_for(queue.get(), interval)
                except TimeoutError:
                    yield None
                    continue
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, Done):
                    ends[i] = item
                yield Choice(i, item)
            yield self._total([end for end in ends if end is not None])
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    def _total(self, ends: list[Done]) -> Done:
        firsts = [end.finished for end in ends[:: self.n]]  # one per prompt
        return Done(
            Finished(
                finish_reason=ends[0].finished.finish_reason,
                prompt_tokens=sum(f.prompt_tokens for f in firsts),
                completion_tokens=sum(end.finished.completion_tokens for end in ends),
                cached_tokens=sum(f.cached_tokens for f in firsts),
                reasoning_tokens=sum(end.finished.reasoning_tokens for end in ends),
            ),
            tuple(call for end in ends for call in end.calls),
        )

    def cancel(self) -> None:
        for gen in self.gens:
            gen.job.cancel()


@dataclass(frozen=True)
class Rendered:
    """A request's output plan and its prompt, before any limit is checked."""

    plan: OutputPlan
    prompt: Prompt


async def render(
    lm: LoadedModel,
    messages: list[dict[str, Any]],
    *,
    tools: list[Any] | None,
    tool_choice: Any,
    parallel: bool | None,
    fmt: JsonFormat | None,
) -> Rendered:
    """Plan tools and format and build the prompt (what token counting needs too)."""
    plan = await asyncio.to_thread(
        plan_output, lm, tools=tools, choice=tool_choice, parallel=parallel, fmt=fmt
    )
    prompt = await asyncio.to_thread(build_prompt, lm, plan.prepare(messages), plan.template_tools)
    return Rendered(plan, prompt)


async def start(
    st: AppState,
    rec: RequestRecord,
    lm: LoadedModel,
    messages: list[dict[str, Any]],
    *,
    tools: list[Any] | None,
    tool_choice: Any,
    parallel: bool | None,
    fmt: JsonFormat | None,
    sampling: Sampling,
    reasoning: str | None = None,
) -> Generation:
    """Plan tools and format, build the prompt, check limits, and submit the job.

    ``reasoning`` overrides ``[model] reasoning`` for this request (an API that lets the
    client turn thinking on or off). Raises API errors (400 for bad tools/schemas/context
    length, 503 when the queue is full) before anything is generated.
    """
    group = await start_choices(
        st,
        rec,
        lm,
        messages,
        tools=tools,
        tool_choice=tool_choice,
        parallel=parallel,
        fmt=fmt,
        sampling=sampling,
        reasoning=reasoning,
        n=1,
    )
    return group.gens[0]


async def start_choices(
    st: AppState,
    rec: RequestRecord,
    lm: LoadedModel,
    messages: list[dict[str, Any]],
    *,
    tools: list[Any] | None,
    tool_choice: Any,
    parallel: bool | None,
    fmt: JsonFormat | None,
    sampling: Sampling,
    reasoning: str | None = None,
    n: int,
) -> Group:
    """:func:`start` for ``n`` choices of one prompt (Chat Completions' ``n``)."""
    rendered = await render(
        lm, messages, tools=tools, tool_choice=tool_choice, parallel=parallel, fmt=fmt
    )
    return await _submit(
        st,
        rec,
        lm,
        [rendered.prompt.ids],
        rendered.plan,
        sampling,
        n=n,
        reasoning_mode=reasoning or entry_for(st.settings, lm).reasoning,
        in_think=rendered.prompt.in_think,
    )


async def start_raw(
    st: AppState,
    rec: RequestRecord,
    lm: LoadedModel,
    prompts: list[list[int]],
    *,
    sampling: Sampling,
    n: int,
) -> Group:
    """Submit already tokenized prompts as they are: no chat template, no tools, ``<think>``
    text left in the output (the legacy completions API). ``n`` choices per prompt, in
    prompt order."""
    plan = await asyncio.to_thread(
        plan_output, lm, tools=None, choice=None, parallel=None, fmt=None
    )
    return await _submit(
        st, rec, lm, prompts, plan, sampling, n=n, reasoning_mode="inline", raw_text=True
    )


async def _submit(
    st: AppState,
    rec: RequestRecord,
    lm: LoadedModel,
    prompts: list[list[int]],
    plan: OutputPlan,
    sampling: Sampling,
    *,
    n: int,
    reasoning_mode: str,
    in_think: bool = False,
    raw_text: bool = False,
) -> Group:
    """Check every prompt's limits, then submit ``n`` jobs per prompt: all or none."""
    requests: list[GenerationRequest] = []
    for ids in prompts:
        params = generation_params(
            st.settings,
            lm,
            len(ids),
            defaults=entry_for(st.settings, lm),
            requested_max=sampling.requested_max,
            max_param=sampling.max_param,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            repetition_penalty=sampling.repetition_penalty,
            stop=sampling.stop,
            top_k=sampling.top_k,
            logits_processors=(GrammarProcessor(plan.grammar),) if plan.grammar else (),
        )
        params = replace(params, raw_text=raw_text, logprobs=sampling.logprobs)
        for j in range(n):
            # With a seed, choice j samples with seed + j: n copies of one sample would make
            # n pointless, and the request stays reproducible.
            seeded = params
            if params.seed is not None and j:
                seeded = replace(params, seed=(params.seed + j) % 2**64)
            requests.append(
                GenerationRequest(
                    model=lm,
                    prompt=ids,
                    params=seeded,
                    reasoning_mode=reasoning_mode,
                    in_think=in_think,
                )
            )
    rec.model = lm.id
    rec.prompt_tokens = sum(len(ids) for ids in prompts)
    if n > 1:
        for ids in prompts:
            await _prefill_once(st, lm, ids, requests[0].params.timeout)
    handles: list[JobHandle] = []
    try:
        for request in requests:
            handles.append(st.engine.submit(request))
    except MlxdError:
        for handle in handles:  # all or none: the queue was full part-way
            handle.cancel()
        raise
    return Group([Generation(h, plan, rec, lm.id) for h in handles], rec, lm.id, n)


async def _prefill_once(st: AppState, lm: LoadedModel, ids: list[int], timeout: float) -> None:
    """Put the KV cache of ``ids`` into the prompt cache, so that ``n`` choices of one prompt
    prefill it once, not ``n`` times: a one-token greedy job whose cache the engine keeps
    when it ends (as it keeps every finished job's). Its token is never shown. A prompt the
    cache already holds costs one decode step."""
    params = GenerationParams(max_tokens=1, temperature=0.0, top_p=1.0, timeout=timeout)
    handle = st.engine.submit(GenerationRequest(model=lm, prompt=ids, params=params))
    try:
        while True:
            event = await handle.next_event(None)
            if isinstance(event, Failed):
                raise event.error
            if isinstance(event, Finished):
                return
    finally:
        handle.cancel()


async def wait_first(source: Generation | Group, timeout: float) -> None:
    """Wait up to ``timeout`` for the first event before a stream starts, so that early
    failures (a model switch, shutdown) are HTTP errors rather than broken streams."""
    gens = source.gens if isinstance(source, Group) else [source]
    firsts = await asyncio.gather(*(gen.job.next_event(timeout) for gen in gens))
    for gen, first in zip(gens, firsts, strict=True):
        gen.first = first
    for first in firsts:
        if isinstance(first, Failed):
            source.cancel()
            raise first.error


async def pieces(gen: Generation, interval: float | None) -> AsyncIterator[Piece | Done | None]:
    """The generation's output as typed pieces, then one :class:`Done`; ``None`` whenever
    ``interval`` seconds pass with nothing new (the caller sends a keep-alive). A failure
    raises its error. Leaving early cancels the job."""
    job, rec = gen.job, gen.record
    reader = gen.plan.reader()
    texts: TokenText | None = None  # made when the first logprobs arrive
    pending, gen.first = gen.first, None
    try:
        while True:
            event = pending if pending is not None else await job.next_event(interval)
            pending = None
            if event is None:
                yield None
            elif isinstance(event, Delta):
                if rec.first_token_at is None:
                    rec.first_token_at = time.perf_counter()
                if event.logprobs:
                    if texts is None:
                        texts = TokenText(job.request.model.tokenizer)
                    yield Logprobs(tuple(texts.entry(e) for e in event.logprobs))
                if event.reasoning:
                    yield Reasoning(event.reasoning)
                for piece in reader.feed(event.content):
                    yield piece
            elif isinstance(event, Failed):
                raise event.error
            else:
                for piece in reader.finish():
                    yield piece
                yield Done(event, tuple(reader.calls))
                return
    finally:
        job.cancel()


async def collect(source: Source[T], take: Callable[[T], object]) -> Done:
    """Drive a non-streaming generation: hand each item to ``take`` (its result is
    ignored); return the end."""
    try:
        async for item in source.items(None):
            if isinstance(item, Done):
                _count(source.record, item)
                return item
            if item is not None:
                take(item)
    finally:
        source.cancel()
    raise AssertionError("the engine ended a job without Finished or Failed")


def _count(rec: RequestRecord, done: Done) -> None:
    rec.completion_tokens = done.finished.completion_tokens
    rec.cached_tokens = done.finished.cached_tokens


class Renderer(Protocol[T_contra]):
    """How one API writes a generation as server-sent events."""

    def opening(self) -> list[bytes]:
        """Frames sent at once, before any output (role chunk, ``message_start``...)."""

    def keepalive(self) -> bytes:
        """A frame for a silent interval (a comment, or an event for clients that only
        count events as activity)."""

    def piece(self, piece: T_contra) -> list[bytes]:
        """Frames for one output piece (a :class:`Choice` for a :class:`Group`)."""

    async def done(self, done: Done) -> list[bytes]:
        """The closing frames; may store the result (an error raised here is sent with
        :meth:`failed`)."""

    def failed(self, error: MlxdError) -> list[bytes]:
        """The terminal frames for a failure after the stream started."""

    def close(self) -> None:
        """Release what the stream held (always called, once)."""


def stream(source: Source[T], renderer: Renderer[T], interval: float) -> AsyncIterator[bytes]:
    """The one SSE loop for ``source``. The request is marked as streaming now (so the app
    leaves its ``request.completed`` line to the stream's end); the loop itself runs after
    the route returned, outside the request context."""
    source.record.streaming = True
    return _stream(source, renderer, interval)


async def _stream(
    source: Source[T], renderer: Renderer[T], interval: float
) -> AsyncIterator[bytes]:
    rec = source.record
    status = 200
    try:
        for frame in renderer.opening():
            yield frame
        try:
            async for item in source.items(interval):
                if item is None:
                    yield renderer.keepalive()
                elif isinstance(item, Done):
                    _count(rec, item)
                    for frame in await renderer.done(item):
                        yield frame
                    return
                else:
                    for frame in renderer.piece(item):
                        yield frame
            raise AssertionError("the engine ended a job without Finished or Failed")
        except MlxdError as exc:
            error = exc
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must still end the stream with a terminal frame
            log.exception("request.failed", error=f"{type(exc).__name__}: {exc}")
            error = MlxdError(f"internal error: {type(exc).__name__}", code="internal_error")
        status = error.status
        rec.error = error.code or error.type
        for frame in renderer.failed(error):
            yield frame
    except asyncio.CancelledError:
        status = 499  # the client closed the connection (nginx's convention)
        rec.error = "client_disconnected"
        raise
    finally:
        source.cancel()
        renderer.close()
        rec.finish(status)


def sse_response(body: AsyncIterator[bytes]) -> Response:
    """A streaming response with no time limit and no proxy buffering."""
    resp = Response(body, mimetype="text/event-stream")
    resp.headers["Cache-Control"] = "no-cache"
    resp.headers["X-Accel-Buffering"] = "no"
    resp.timeout = None
    return resp
