"""The engine thread with the real bundled model, driven from asyncio in-process."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest

from mlxd.config import EngineSettings, ModelSettings
from mlxd.engine.core import (
    Delta,
    Engine,
    Event,
    Failed,
    Finished,
    GenerationParams,
    GenerationRequest,
)
from mlxd.errors import BadRequest, GenerationFailed, ModelUnavailable
from mlxd.prompt import build_prompt

#: Prefill chunks of 128 tokens: a long prompt takes several steps, and one step stays short
#: on the slowest CPU (MLX's reference BLAS, a loaded machine: seconds, not a minute).
CHUNK = 128


def settings(**changes: Any) -> EngineSettings:
    return EngineSettings(max_batch_size=4, prefill_step_size=CHUNK, **changes)


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    eng = Engine(ModelSettings(), settings())
    eng.start()
    assert eng.ready_event.wait(120), eng.load_error
    yield eng
    eng.stop()


def clear_prompt_cache(engine: Engine) -> None:
    """Empty the prompt cache through the engine's inbox (a zero budget, then the old one)."""
    engine.retune(settings(prompt_cache_bytes=0))
    engine.retune(settings())


async def ask(
    engine: Engine,
    question: str,
    *,
    max_tokens: int = 24,
    history: list[dict[str, str]] | None = None,
) -> tuple[str, Finished]:
    lm = engine.require_model()
    messages = [*(history or []), {"role": "user", "content": question}]
    prompt = build_prompt(lm, messages)
    job = engine.submit(
        GenerationRequest(
            model=lm,
            prompt=prompt.ids,
            params=GenerationParams(max_tokens=max_tokens, temperature=0.0, top_p=1.0),
            in_think=prompt.in_think,
        )
    )
    text = []
    async for ev in engine.collect(job):
        if isinstance(ev, Delta):
            text.append(ev.content)
        elif isinstance(ev, Failed):
            raise ev.error
        else:
            return "".join(text), ev
    raise AssertionError("no Finished event")


def test_concurrent_questions_get_their_own_answers(engine: Engine) -> None:
    """Batched requests with different questions each get the answer they get alone."""
    questions = [
        "What is the capital of France?",
        "What is the capital of Italy?",
        "What is 3 plus 4?",
        "What color is grass?",
        "Name a big cat.",
    ]

    async def main() -> tuple[list[str], list[str]]:
        alone = [(await ask(engine, q))[0] for q in questions]
        together = await asyncio.gather(*(ask(engine, q) for q in questions))
        return alone, [t for t, _ in together]

    alone, together = asyncio.run(main())
    assert together == alone
    assert "Paris" in alone[0]
    assert len(set(alone)) == len(alone)


def test_prompt_cache_hit_gives_same_text(engine: Engine) -> None:
    """A follow-up turn reuses the cached prefix (cached_tokens > 0) with the same text as cold."""

    async def main() -> tuple[str, Finished, str, Finished]:
        first, _ = await ask(engine, "What is the capital of France?")
        history = [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": first},
        ]
        clear_prompt_cache(engine)
        cold, cold_fin = await ask(engine, "And of Germany?", history=history)
        warm, warm_fin = await ask(engine, "And of Germany?", history=history)
        return cold, cold_fin, warm, warm_fin

    cold, cold_fin, warm, warm_fin = asyncio.run(main())
    assert cold_fin.cached_tokens == 0
    assert warm_fin.cached_tokens > 20
    assert warm == cold


def test_cache_is_bounded_by_budget(engine: Engine) -> None:
    """The prompt cache never holds more than its byte budget."""
    asyncio.run(ask(engine, "Say hello."))
    assert engine.status().prompt_cache_entries > 0
    engine.retune(settings(prompt_cache_bytes=1))
    try:
        asyncio.run(ask(engine, "Say hello again."))
        assert engine.status().prompt_cache_entries == 0
    finally:
        engine.retune(settings())


def test_cache_dropped_on_model_switch(engine: Engine) -> None:
    """Loading a model (even the same one again) empties the prompt cache."""
    asyncio.run(ask(engine, "What is the capital of Spain?"))
    assert engine.status().prompt_cache_entries > 0
    old = engine.current
    engine.request_load(ModelSettings()).result(timeout=120)
    assert engine.current is not old
    assert engine.status().prompt_cache_entries == 0
    text, _ = asyncio.run(ask(engine, "What is the capital of France?"))
    assert "Paris" in text


def test_cancelled_job_frees_its_slot(engine: Engine) -> None:
    """Abandoning a job's event stream cancels it; the engine goes idle."""

    async def main() -> None:
        lm = engine.require_model()
        prompt = build_prompt(lm, [{"role": "user", "content": "Write a long story."}])
        job = engine.submit(
            GenerationRequest(
                model=lm,
                prompt=prompt.ids,
                params=GenerationParams(max_tokens=500, temperature=0.0, top_p=1.0),
            )
        )
        async for ev in engine.collect(job):
            if isinstance(ev, Delta):
                break
        for _ in range(100):
            if engine.active_count() == 0:
                return
            await asyncio.sleep(0.05)
        raise AssertionError("job still active after cancel")

    asyncio.run(main())


def request(
    engine: Engine, question: str, *, max_tokens: int = 24, **params: Any
) -> GenerationRequest:
    lm = engine.require_model()
    prompt = build_prompt(lm, [{"role": "user", "content": question}])
    sampling = {"temperature": 0.0, "top_p": 1.0, **params}
    return GenerationRequest(
        model=lm, prompt=prompt.ids, params=GenerationParams(max_tokens=max_tokens, **sampling)
    )


async def run(engine: Engine, req: GenerationRequest) -> tuple[str, Event]:
    """The request's content and its last event (Finished or Failed)."""
    job = engine.submit(req)
    text = []
    async for ev in engine.collect(job):
        if isinstance(ev, Delta):
            text.append(ev.content)
        else:
            return "".join(text), ev
    raise AssertionError("no terminal event")


async def wait_until(check: Callable[[], bool], what: str, seconds: float = 60.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_requests_arriving_during_a_model_switch_all_end(engine: Engine) -> None:
    """Jobs submitted right after a switch was asked for each end with their answer or a
    retryable 503 (never a hang or a crash), and the new model serves afterwards."""

    async def main() -> list[Event]:
        reqs = [request(engine, f"Count to {i}.", max_tokens=8) for i in range(6)]
        fut = engine.request_load(ModelSettings())
        ends = await asyncio.gather(*(run(engine, r) for r in reqs))
        await asyncio.wrap_future(fut)
        text, last = await run(engine, request(engine, "What is the capital of France?"))
        assert isinstance(last, Finished) and "Paris" in text
        return [ev for _, ev in ends]

    for ev in asyncio.run(main()):
        assert isinstance(ev, Finished) or (
            isinstance(ev, Failed) and isinstance(ev.error, ModelUnavailable)
        ), ev
    assert engine.status().queue_depth == 0


def test_retune_during_decoding_keeps_the_generation(engine: Engine) -> None:
    """Shrinking the prompt cache while a sequence decodes neither breaks nor changes it."""

    async def main() -> tuple[str, str, Event]:
        req = request(engine, "Write a short poem about the sea.", max_tokens=40)
        alone, _ = await run(engine, req)
        job = engine.submit(req)
        text = []
        async for ev in engine.collect(job):
            if isinstance(ev, Delta):
                if not text:
                    engine.retune(settings(prompt_cache_bytes=1))
                text.append(ev.content)
            else:
                return alone, "".join(text), ev
        raise AssertionError("no terminal event")

    try:
        alone, during, last = asyncio.run(main())
    finally:
        engine.retune(settings())
    assert isinstance(last, Finished)
    assert during == alone


def test_cancelled_waiting_jobs_leave_the_queue(engine: Engine) -> None:
    """Jobs cancelled while they wait for a slot never run and leave the queue depth at 0."""

    async def main() -> list[Event]:
        running = [engine.submit(request(engine, f"Story {i}.", max_tokens=16)) for i in range(4)]
        waiting = [engine.submit(request(engine, f"Tale {i}.", max_tokens=16)) for i in range(3)]
        for job in waiting:
            job.cancel()
        ends = []
        for job in running:
            async for ev in engine.collect(job):
                if not isinstance(ev, Delta):
                    ends.append(ev)
        await wait_until(lambda: engine.status().queue_depth == 0, "an empty queue")
        return ends

    ends = asyncio.run(main())
    assert all(isinstance(ev, Finished) for ev in ends)


def test_reasoning_tokens_are_counted_by_the_engine(engine: Engine) -> None:
    """A generation that starts inside <think> (and never closes it) has every decoding step
    counted as a reasoning token and no content."""
    req = replace(request(engine, "Hello.", max_tokens=12), in_think=True)
    text, last = asyncio.run(run(engine, req))
    assert isinstance(last, Finished)
    assert text == ""
    assert last.completion_tokens > 0
    assert last.reasoning_tokens == last.completion_tokens


def test_bad_seed_fails_alone(engine: Engine) -> None:
    """A seed outside 0..2**64-1 fails its own request with a 400; a request batched beside
    it gets the text it gets alone."""

    async def main() -> tuple[str, list[tuple[str, Event]]]:
        good = request(engine, "What is the capital of France?")
        alone, _ = await run(engine, good)
        ends = await asyncio.gather(
            run(engine, request(engine, "Hi.", temperature=0.7, seed=-1)),
            run(engine, good),
            run(engine, request(engine, "Hi.", temperature=0.7, seed=2**64)),
        )
        return alone, list(ends)

    alone, ends = asyncio.run(main())
    assert isinstance(ends[1][1], Finished) and ends[1][0] == alone
    for _, ev in (ends[0], ends[2]):
        assert isinstance(ev, Failed) and isinstance(ev.error, BadRequest)
        assert "seed" in str(ev.error)


class FailingProcessor:
    """A logits processor that breaks after a few steps, the way a grammar matcher can:
    either by raising or by setting ``error`` (GrammarProcessor's contract)."""

    def __init__(self, after: int, *, raises: bool) -> None:
        self.calls = 0
        self.after = after
        self.raises = raises
        self.error: str | None = None

    def __call__(self, tokens: Any, logits: Any) -> Any:
        self.calls += 1
        if self.calls > self.after:
            if self.raises:
                raise RuntimeError("matcher exploded")
            self.error = "token not allowed by the grammar"
        return logits


@pytest.mark.parametrize("raises", [True, False])
def test_failing_sequence_fails_alone(engine: Engine, raises: bool) -> None:
    """A sequence whose logits processor fails ends as Failed (500, with the reason), not as
    an ordinary stop, and the sequence batched beside it is unaffected."""

    async def main() -> tuple[str, list[tuple[str, Event]]]:
        good = request(engine, "What is the capital of France?")
        alone, _ = await run(engine, good)
        bad = request(engine, "Tell me a story.", max_tokens=40)
        bad = replace(
            bad,
            params=replace(bad.params, logits_processors=(FailingProcessor(3, raises=raises),)),
        )
        ends = await asyncio.gather(run(engine, bad), run(engine, good))
        return alone, list(ends)

    alone, ends = asyncio.run(main())
    assert isinstance(ends[1][1], Finished) and ends[1][0] == alone
    failed = ends[0][1]
    assert isinstance(failed, Failed) and isinstance(failed.error, GenerationFailed)
    assert ("matcher exploded" if raises else "not allowed by the grammar") in str(failed.error)


async def run_staged(
    engine: Engine, first: GenerationRequest, later: list[GenerationRequest], after: int
) -> list[tuple[str, Event]]:
    """Run ``first``; once it has produced ``after`` deltas, submit ``later`` (they join it
    mid-generation). The content and last event of each, ``first`` first."""
    job = engine.submit(first)
    text: list[str] = []
    others: list[asyncio.Task[tuple[str, Event]]] = []
    last: Event | None = None
    async for ev in engine.collect(job):
        if isinstance(ev, Delta):
            text.append(ev.content)
            if len(text) == after:
                others = [asyncio.ensure_future(run(engine, r)) for r in later]
        else:
            last = ev
    assert last is not None and others, "the first request ended before the others joined"
    return [("".join(text), last), *[await t for t in others]]


def test_greedy_tokens_do_not_depend_on_company(engine: Engine) -> None:
    """At temperature 0 a request's output is the same alone (fast path), when others join
    it mid-generation (it moves into the batch), when it becomes the only one left (it
    leaves the batch again), and when it joins a running batch itself."""
    long = request(engine, "Write a short story about a lighthouse keeper.", max_tokens=48)
    short = [request(engine, q, max_tokens=6) for q in ("Name a color.", "Say hi.")]

    async def main() -> None:
        alone = [await run(engine, r) for r in (long, *short)]
        # Others join the long one after 4 tokens, finish, and leave it alone again.
        staged = await run_staged(engine, long, short, after=4)
        assert [t for t, _ in staged] == [t for t, _ in alone]
        for (_, a), (_, b) in zip(alone, staged, strict=True):
            assert isinstance(a, Finished) and isinstance(b, Finished)
            assert a.completion_tokens == b.completion_tokens
        # The short ones join a long one that is already in a batch.
        staged = await run_staged(engine, short[0], [long, short[1]], after=1)
        assert sorted(t for t, _ in staged) == sorted(t for t, _ in alone)

    asyncio.run(main())


def test_stop_string_ends_a_joined_sequence(engine: Engine) -> None:
    """A stop string ends a sequence the same way on the fast path and inside a batch."""
    text, _ = asyncio.run(run(engine, request(engine, "Write a short story.", max_tokens=30)))
    words = text.split()
    assert len(words) > 6
    stop = " " + words[5]
    req = request(engine, "Write a short story.", max_tokens=30, stop=(stop,))

    async def main() -> list[tuple[str, Event]]:
        alone = await run(engine, req)
        together = await asyncio.gather(
            run(engine, req), run(engine, request(engine, "Say hi.", max_tokens=20))
        )
        return [alone, together[0]]

    for out, ev in asyncio.run(main()):
        assert isinstance(ev, Finished) and ev.finish_reason == "stop"
        assert out == text[: text.index(stop)]


def test_cancel_during_a_long_prefill(engine: Engine) -> None:
    """A job cancelled while its long prompt is being prefilled is dropped (between chunks)
    and the engine serves the next request. The engine counts it as active from its
    admission, before its first chunk has run; the cancel takes effect within one chunk."""

    async def main() -> tuple[str, Event]:
        long = request(engine, "Summarize: " + "the quick brown fox jumps. " * 200)
        assert len(long.prompt) > 8 * CHUNK
        job = engine.submit(long)
        await wait_until(lambda: engine.status().active == 1, "the long prompt to start")
        job.cancel()
        await wait_until(lambda: engine.status().active == 0, "the cancel to take effect")
        return await run(engine, request(engine, "What is the capital of France?"))

    text, last = asyncio.run(main())
    assert isinstance(last, Finished) and "Paris" in text
