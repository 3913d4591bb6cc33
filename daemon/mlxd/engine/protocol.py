"""The engine-client boundary: what the API hands the engine and what it gets back.

Everything here is immutable or owned by one side: a :class:`GenerationRequest` is frozen, the
events are frozen, :class:`EngineStatus` is a snapshot the engine thread publishes whole. The
one object both sides hold is the :class:`JobHandle`, and of it the engine thread touches only
``loop`` (to hop onto it with the step's events); everything else belongs to the event loop. So no
field is ever written by one thread while the other reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import MlxdError

if TYPE_CHECKING:
    from .loader import LoadedModel
    from .residency import ModelStatus

LogitsProcessor = Callable[[Any, Any], Any]


@dataclass(frozen=True)
class GenerationParams:
    """Per-request generation settings, already validated and defaulted by the API layer."""

    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...] = ()
    seed: int | None = None
    repetition_penalty: float | None = None
    top_k: int = 0  # 0: off
    timeout: float = 600.0
    logits_processors: tuple[LogitsProcessor, ...] = ()
    #: Text exactly as generated: a leading space is kept (completions continue a prompt;
    #: a chat answer's leading space is trimmed).
    raw_text: bool = False
    #: None: no logprobs; k: each token's logprob and its k most likely alternatives.
    logprobs: int | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """One generation as the API asks for it: the model it was tokenized for, the prompt ids,
    the sampling settings and how ``<think>`` text is exposed."""

    model: LoadedModel
    prompt: list[int]
    params: GenerationParams
    reasoning_mode: str = "separate"
    in_think: bool = False


# Events sent from the engine thread to the request ------------------------------------
@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the ``k`` most likely tokens at its step
    (ids and log-probabilities, most likely first), from the distribution after logits
    processors (repetition penalty, grammar masks) and before temperature and top-p/top-k."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Delta:
    content: str = ""
    reasoning: str = ""
    #: The tokens generated since the last Delta (only when the request asked for logprobs);
    #: their text is this Delta's or, when held back (a stop string that may still match,
    #: an incomplete character), a later one's.
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    #: Decoding steps whose text went to the reasoning channel (inside ``<think>``).
    reasoning_tokens: int = 0
    stop_sequence: str | None = None  # the stop string that ended the text, if one did


@dataclass(frozen=True)
class Failed:
    error: MlxdError


Event = Delta | Finished | Failed


@dataclass(frozen=True)
class EngineStatus:
    """What the engine looks like now, published whole by the engine thread."""

    state: str = "loading"  # loading | ready | failed | stopped
    model: LoadedModel | None = None
    queue_depth: int = 0
    active: int = 0
    device: tuple[tuple[str, str], ...] = ()
    load_error: str | None = None
    prompt_cache_entries: int = 0
    prompt_cache_bytes: int = 0
    #: Every configured model (config order) and the memory budget they share.
    models: tuple[ModelStatus, ...] = ()
    budget_bytes: int = 0
    used_bytes: int = 0


class JobHandle:
    """The API's side of one generation: its event queue and its cancel.

    Made by :meth:`Engine.submit` on the event loop. The engine thread only calls
    :meth:`deliver`, which hops onto the loop; a cancel is a message to the engine thread.
    """

    def __init__(
        self,
        job_id: int,
        request: GenerationRequest,
        loop: asyncio.AbstractEventLoop,
        send_cancel: Callable[[int], None],
    ) -> None:
        self.id = job_id
        self.request = request
        self._loop = loop
        self._send_cancel = send_cancel
        # Events not read yet, and the future a reader waiting for the next one sleeps on.
        # (Not an ``asyncio.Queue`` read through ``asyncio.wait``: that made a task, a
        # waiter set and callbacks per token, the largest per-token cost on the event loop.)
        self._events: deque[Event] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._over = False  # a Finished/Failed was read: nothing left to cancel

    @property
    def params(self) -> GenerationParams:
        return self.request.params

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    @property
    def open(self) -> bool:
        """Neither cancelled nor read to its end."""
        return not self._over

    def deliver(self, event: Event) -> None:
        """From any thread: queue ``event`` on the handle's event loop."""
        # RuntimeError: the event loop is gone (shutdown); nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self.deliver_now, event)

    def deliver_now(self, event: Event) -> None:
        """On the handle's event loop: queue ``event`` and wake its reader."""
        self._events.append(event)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def cancel(self) -> None:
        """The client went away (or the request is over): tell the engine to drop the job
        (a reader waiting for an event gets ``CancelledError``)."""
        if self._waiter is not None and not self._waiter.done():
            self._waiter.cancel()
        if not self._over:
            self._over = True
            self._send_cancel(self.id)

    async def next_event(self, timeout: float | None) -> Event | None:
        """The next event, or None after ``timeout`` seconds with none (an event that arrives
        later stays queued for the next call: none is lost to a timeout or a cancel)."""
        if not self._events:
            waiter = self._waiter = self._loop.create_future()
            timer = None
            if timeout is not None:
                timer = self._loop.call_later(timeout, _wake, waiter)
            try:
                await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
            if not self._events:
                return None
        event = self._events.popleft()
        if isinstance(event, Finished | Failed):
            self._over = True
        return event


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
