"""The engine thread with the real bundled model, driven from asyncio in-process."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from mlxd.config import EngineSettings, ModelSettings
from mlxd.engine.core import Delta, Engine, Failed, Finished, GenerationParams, Job
from mlxd.prompt import build_prompt


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    eng = Engine(ModelSettings(), EngineSettings(max_batch_size=4))
    eng.start()
    assert eng.ready_event.wait(120), eng.load_error
    yield eng
    eng.stop()


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
    job = Job(
        model=lm,
        prompt=prompt.ids,
        params=GenerationParams(max_tokens=max_tokens, temperature=0.0, top_p=1.0),
        reasoning_mode="separate",
        in_think=prompt.in_think,
        loop=asyncio.get_running_loop(),
    )
    engine.submit(job)
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
        engine.prompt_cache.clear()
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
    assert len(engine.prompt_cache) > 0
    engine.prompt_cache.resize(1)
    try:
        assert len(engine.prompt_cache) == 0
        asyncio.run(ask(engine, "Say hello again."))
        assert len(engine.prompt_cache) == 0
    finally:
        engine.prompt_cache.resize(EngineSettings().prompt_cache_bytes)


def test_cache_dropped_on_model_switch(engine: Engine) -> None:
    """Loading a model (even the same one again) empties the prompt cache."""
    asyncio.run(ask(engine, "What is the capital of Spain?"))
    assert len(engine.prompt_cache) > 0
    old = engine.current
    engine.request_load(ModelSettings()).result(timeout=120)
    assert engine.current is not old
    assert len(engine.prompt_cache) == 0
    text, _ = asyncio.run(ask(engine, "What is the capital of France?"))
    assert "Paris" in text


def test_cancelled_job_frees_its_slot(engine: Engine) -> None:
    """Abandoning a job's event stream cancels it; the engine goes idle."""

    async def main() -> None:
        lm = engine.require_model()
        prompt = build_prompt(lm, [{"role": "user", "content": "Write a long story."}])
        job = Job(
            model=lm,
            prompt=prompt.ids,
            params=GenerationParams(max_tokens=500, temperature=0.0, top_p=1.0),
            reasoning_mode="separate",
            in_think=False,
            loop=asyncio.get_running_loop(),
        )
        engine.submit(job)
        async for ev in engine.collect(job):
            if isinstance(ev, Delta):
                break
        for _ in range(100):
            if engine.active_count() == 0:
                return
            await asyncio.sleep(0.05)
        raise AssertionError("job still active after cancel")

    asyncio.run(main())
