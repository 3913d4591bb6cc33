"""The path both APIs share from validated request to running job.

Chat Completions and Responses differ in how they build messages and how they shape output;
everything between — tool/format planning, prompt, limits, the job, and the wait for its
first event — is here once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from quart import Response

from ..engine.constrain import GrammarProcessor
from ..engine.core import Delta, Event, Failed, Finished, Job
from ..engine.loader import LoadedModel
from ..prompt import build_prompt
from .app import AppState, RequestRecord
from .params import generation_params
from .tools import JsonFormat, OutputPlan, plan_output


@dataclass
class Sampling:
    """The request's generation fields, named the same in both APIs."""

    requested_max: int | None
    max_param: str
    temperature: float | None
    top_p: float | None
    seed: int | None
    repetition_penalty: float | None
    stop: tuple[str, ...] = ()


async def start_job(
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
) -> tuple[OutputPlan, Job]:
    """Plan tools and format, build the prompt, check limits, and submit the job.

    Raises OpenAI-shaped errors (400 for bad tools/schemas/context length, 503 when the queue
    is full) before anything is generated.
    """
    plan = await asyncio.to_thread(
        plan_output, lm, tools=tools, choice=tool_choice, parallel=parallel, fmt=fmt
    )
    prompt = await asyncio.to_thread(build_prompt, lm, plan.prepare(messages), plan.template_tools)
    params = generation_params(
        st.settings,
        lm,
        len(prompt.ids),
        requested_max=sampling.requested_max,
        max_param=sampling.max_param,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        seed=sampling.seed,
        repetition_penalty=sampling.repetition_penalty,
        stop=sampling.stop,
        logits_processors=(GrammarProcessor(plan.grammar),) if plan.grammar else (),
    )
    job = Job(
        model=lm,
        prompt=prompt.ids,
        params=params,
        reasoning_mode=st.settings.model.reasoning,
        in_think=prompt.in_think,
        loop=asyncio.get_running_loop(),
    )
    rec.prompt_tokens = len(prompt.ids)
    st.engine.submit(job)
    return plan, job


async def run_to_end(
    st: AppState, job: Job, rec: RequestRecord, on_delta: Callable[[Delta], None]
) -> Finished:
    """Drive a non-streaming job: hand each Delta to ``on_delta``, raise a Failed's error,
    record first-token time and token counts, and return the Finished event."""
    fin: Finished | None = None
    try:
        async for event in st.engine.collect(job):
            if isinstance(event, Delta):
                if rec.first_token_at is None:
                    rec.first_token_at = time.perf_counter()
                on_delta(event)
            elif isinstance(event, Failed):
                raise event.error
            else:
                fin = event
    finally:
        job.cancel()
    assert fin is not None
    rec.completion_tokens = fin.completion_tokens
    rec.cached_tokens = fin.cached_tokens
    return fin


async def first_event(st: AppState, job: Job) -> Event | None:
    """Wait briefly for the job's first event before a stream starts, so that early failures
    (a model switch, shutdown) are HTTP errors rather than broken streams; None if it is slow
    to come (the stream then starts with keep-alives)."""
    first = await job.next_event(min(st.settings.server.sse_keepalive_seconds, 2.0))
    if isinstance(first, Failed):
        job.cancel()
        raise first.error
    return first


def sse_response(body: Any) -> Response:
    """A streaming response with no time limit and no proxy buffering."""
    resp = Response(body, mimetype="text/event-stream")
    resp.headers["Cache-Control"] = "no-cache"
    resp.headers["X-Accel-Buffering"] = "no"
    resp.timeout = None
    return resp
