"""JobHandle: the event queue between the engine thread and a request's reader.

Real asyncio loop, real threads (the engine delivers from its own thread); no engine.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from mlxd.engine.protocol import Delta, Event, Finished, GenerationRequest, JobHandle


def _handle(loop: asyncio.AbstractEventLoop, cancels: list[int]) -> JobHandle:
    request = GenerationRequest.__new__(GenerationRequest)  # never read here
    return JobHandle(7, request, loop, cancels.append)


def test_events_from_another_thread_arrive_in_order() -> None:
    async def run() -> list[Event | None]:
        handle = _handle(asyncio.get_running_loop(), [])
        events: list[Event] = [Delta(str(i)) for i in range(200)] + [Finished("stop", 1, 200)]

        def engine() -> None:
            for event in events:
                handle.deliver(event)

        thread = threading.Thread(target=engine)
        thread.start()
        got: list[Event | None] = []
        while not got or not isinstance(got[-1], Finished):
            got.append(await handle.next_event(30))
        thread.join()
        return got

    got = asyncio.run(run())
    assert [e.content for e in got if isinstance(e, Delta)] == [str(i) for i in range(200)]
    assert isinstance(got[-1], Finished)


def test_a_timeout_returns_none_and_the_late_event_is_kept() -> None:
    async def run() -> tuple[Event | None, Event | None, Event | None]:
        loop = asyncio.get_running_loop()
        handle = _handle(loop, [])
        first = await handle.next_event(0.01)
        loop.call_later(0.05, handle.deliver_now, Delta("late"))
        loop.call_later(0.06, handle.deliver_now, Delta("later"))
        second = await handle.next_event(5)
        await asyncio.sleep(0.1)
        third = await handle.next_event(0)  # queued already: no wait at all
        return first, second, third

    first, second, third = asyncio.run(run())
    assert first is None
    assert isinstance(second, Delta) and second.content == "late"
    assert isinstance(third, Delta) and third.content == "later"


def test_cancel_wakes_a_waiting_reader_and_tells_the_engine_once() -> None:
    cancels: list[int] = []

    async def run() -> None:
        handle = _handle(asyncio.get_running_loop(), cancels)
        reader = asyncio.ensure_future(handle.next_event(None))
        await asyncio.sleep(0.01)
        handle.cancel()
        handle.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader

    asyncio.run(run())
    assert cancels == [7]


def test_reading_the_end_means_nothing_is_left_to_cancel() -> None:
    cancels: list[int] = []

    async def run() -> None:
        handle = _handle(asyncio.get_running_loop(), cancels)
        handle.deliver_now(Finished("stop", 1, 0))
        assert isinstance(await handle.next_event(None), Finished)
        handle.cancel()

    asyncio.run(run())
    assert cancels == []


def test_a_cancelled_reader_loses_no_event() -> None:
    async def run() -> Event | None:
        loop = asyncio.get_running_loop()
        handle = _handle(loop, [])
        reader = asyncio.ensure_future(handle.next_event(None))
        await asyncio.sleep(0.01)
        reader.cancel()  # e.g. the client went away while waiting
        handle.deliver_now(Delta("kept"))
        return await handle.next_event(1)

    event = asyncio.run(run())
    assert isinstance(event, Delta) and event.content == "kept"


def test_abort_reaches_open_handles_while_the_engine_thread_is_busy() -> None:
    """The shutdown budget's abort: every handle still open gets the error at once, from the
    event loop, even though the engine thread is not draining its inbox (here: never started,
    as when it is inside a prefill chunk that takes seconds); a cancelled one is not counted."""
    from mlxd.config import EngineSettings, ModelSettings
    from mlxd.engine.core import Engine
    from mlxd.engine.protocol import Failed
    from mlxd.errors import ModelUnavailable

    engine = Engine(ModelSettings(), EngineSettings())  # its thread is not running
    request = GenerationRequest.__new__(GenerationRequest)  # never read here
    error = ModelUnavailable("mlxd is shutting down", retry_after=5)

    async def run() -> tuple[int, Event | None, int]:
        running, gone = engine.submit(request), engine.submit(request)
        gone.cancel()
        count = engine.abort_all(error)
        event = await running.next_event(30)
        return count, event, engine.abort_all(error)

    count, event, again = asyncio.run(run())
    assert count == 1 and isinstance(event, Failed) and event.error is error
    assert again == 0  # its reader has seen the end
