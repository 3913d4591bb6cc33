"""pipeline.Group: several generations merged into one response (Chat n, completion prompts).

The jobs are small fakes with the JobHandle interface the pipeline reads (``next_event``,
``cancel``); the events are the engine's own types.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mlxd.api.context import RequestRecord
from mlxd.api.pipeline import Choice, Done, Generation, Group, collect
from mlxd.api.tools import OutputPlan, Text
from mlxd.engine.protocol import Delta, Event, Failed, Finished
from mlxd.errors import GenerationFailed


class FakeJob:
    """Scripted events, one per ``next_event``; records whether it was cancelled."""

    def __init__(self, events: list[Event], delay: float = 0.0) -> None:
        self.events = list(events)
        self.delay = delay
        self.left = delay  # of the wait for the next event
        self.cancelled = False

    async def next_event(self, timeout: float | None) -> Event | None:
        if timeout is not None and self.left > timeout:  # like JobHandle: None on timeout
            await asyncio.sleep(timeout)
            self.left -= timeout
            return None
        await asyncio.sleep(self.left)
        self.left = self.delay
        return self.events.pop(0)

    def cancel(self) -> None:
        self.cancelled = True


def _plan() -> OutputPlan:
    return OutputPlan(functions=[], mode="none", name=None, parallel=False, native=False, fmt=None)


def _group(jobs: list[FakeJob], n: int) -> Group:
    rec = RequestRecord("req_1", "POST", "/v1/x", 0.0)
    gens = [Generation(job, _plan(), rec, "m") for job in jobs]  # type: ignore[arg-type]
    return Group(gens, rec, "m", n)


def _finished(prompt: int, completion: int, reason: str = "stop") -> Finished:
    return Finished(reason, prompt_tokens=prompt, completion_tokens=completion, cached_tokens=1)


def test_choices_keep_their_index_and_usage_counts_each_prompt_once() -> None:
    """Pieces come tagged with their choice; each choice ends with its own Done; the total
    counts every completion token and each prompt once (n=2 choices of 2 prompts)."""
    jobs = [
        FakeJob([Delta("a"), Delta("b"), _finished(5, 2)]),
        FakeJob([Delta("c"), _finished(5, 1, "length")], delay=0.001),
        FakeJob([Delta("d"), _finished(7, 1)]),
        FakeJob([_finished(7, 0)]),
    ]
    taken: list[Choice] = []
    done = asyncio.run(collect(_group(jobs, 2), taken.append))
    text: dict[int, str] = {}
    ends: dict[int, str] = {}
    for c in taken:
        if isinstance(c.item, Text):
            text[c.index] = text.get(c.index, "") + c.item.text
        elif isinstance(c.item, Done):
            ends[c.index] = c.item.finish_reason
    assert text == {0: "ab", 1: "c", 2: "d"}
    assert ends == {0: "stop", 1: "length", 2: "stop", 3: "stop"}
    assert done.finished.prompt_tokens == 12
    assert done.finished.completion_tokens == 4
    assert done.finished.cached_tokens == 2
    assert all(job.cancelled for job in jobs)


def test_one_failing_choice_fails_the_response_and_cancels_the_rest() -> None:
    """A Failed event of any choice raises its error; every other job is cancelled."""
    slow = FakeJob([Delta("x")] * 50 + [_finished(3, 50)], delay=0.01)
    bad = FakeJob([Failed(GenerationFailed("boom"))])
    with pytest.raises(GenerationFailed, match="boom"):
        asyncio.run(collect(_group([slow, bad], 2), lambda item: None))
    assert slow.cancelled and slow.events  # stopped before its end


@pytest.mark.parametrize("choices", [1, 2])
def test_silence_yields_keepalive_markers(choices: int) -> None:
    """While no choice has anything new for ``interval`` seconds, the items are None (one
    choice reads its job directly, several through one queue)."""

    async def run() -> list[Any]:
        jobs = [FakeJob([Delta("late"), _finished(1, 1)], delay=0.2) for _ in range(choices)]
        return [item async for item in _group(jobs, choices).items(0.02)]

    items = asyncio.run(run())
    assert items[0] is None
    assert [type(c.item) for c in items if isinstance(c, Choice)].count(Done) == choices
    assert isinstance(items[-1], Done)
    assert items[-1].finished.completion_tokens == choices


def test_one_choice_reads_its_job_without_a_queue() -> None:
    """A single generation's pieces and end come through in order, then the total (the
    same shape as with several choices), and the job is cancelled when the reader leaves."""
    job = FakeJob([Delta("a"), Delta("b"), _finished(4, 2, "length")])

    async def run() -> list[Any]:
        return [item async for item in _group([job], 1).items(None)]

    items = asyncio.run(run())
    assert [c.item.text for c in items if isinstance(c, Choice) and isinstance(c.item, Text)] == [
        "a",
        "b",
    ]
    assert isinstance(items[-2], Choice) and isinstance(items[-2].item, Done)
    assert isinstance(items[-1], Done) and items[-1].finish_reason == "length"
    assert items[-1].finished.prompt_tokens == 4
    assert job.cancelled
