"""A request's ``model`` name to the loaded model that answers it (the one place routes ask).

:func:`model_for` resolves the name through the :class:`~mlxd.models.registry.Router` of the
settings in effect (404 ``model_not_found`` listing the ids), applies the request's
``keep_alive``, and waits for the engine to have the model loaded, loading it on demand:
concurrent first requests share one load. A load that fails, or that cannot fit the memory
budget, is a 503 with ``Retry-After``; the next request tries again.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ..config import ModelSettings, Settings
from ..engine.loader import LoadedModel
from ..errors import BadRequest, MlxdError
from ..models.registry import Router
from . import sse
from .context import AppState, RequestRecord

_cache_lock = threading.Lock()
_cache: tuple[Settings, Router] | None = None
_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
#: A request's keep_alive of 0 ("unload when done"): the smallest idle time there is.
IMMEDIATE = 0.001


def router(settings: Settings) -> Router:
    """The router of ``settings`` (built once per settings tree; reload swaps the tree)."""
    global _cache
    with _cache_lock:
        if _cache is None or _cache[0] is not settings:
            _cache = (settings, Router.from_settings(settings))
        return _cache[1]


def entry_for(settings: Settings, lm: LoadedModel) -> ModelSettings:
    """The configured entry a loaded model was loaded for (its generation defaults)."""
    return router(settings).entries.get(lm.id) or settings.model


def keep_alive_seconds(value: Any) -> float | None:
    """A request's ``keep_alive`` as Ollama takes it: seconds, or "30s" / "5m" / "1h"; 0
    unloads the model as soon as it is idle, a negative value keeps it loaded. Returned in
    the config's terms (0: never unload). None: not given."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise BadRequest("keep_alive must be a number of seconds or a duration such as '5m'")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if match is None:
            raise BadRequest(
                f"keep_alive {value!r} is not a duration; use seconds or e.g. '30s', '5m', '1h'",
                param="keep_alive",
            )
        seconds = float(match.group(1)) * _UNIT[match.group(2)]
    return 0.0 if seconds < 0 else max(seconds, IMMEDIATE)


def request_model(
    st: AppState, rec: RequestRecord, name: str | None, *, keep_alive: Any = None
) -> asyncio.Future[LoadedModel]:
    """Resolve ``name`` now (404 here) and ask the engine for the model; the future resolves
    when it is loaded, or fails with a 503."""
    entry = router(st.settings).resolve(name)
    rec.model = entry.id
    seconds = keep_alive_seconds(keep_alive)
    if seconds is not None:
        st.engine.set_keep_alive(entry.id, seconds)
    return asyncio.wrap_future(st.engine.acquire(entry.id))


async def model_for(
    st: AppState, rec: RequestRecord, name: str | None, *, keep_alive: Any = None
) -> LoadedModel:
    """The loaded model that answers ``name`` (loading it first if needed)."""
    return await request_model(st, rec, name, keep_alive=keep_alive)


async def loaded_within(load: asyncio.Future[LoadedModel], seconds: float) -> bool:
    """True when ``load`` is done within ``seconds`` (it keeps going either way)."""
    done, _ = await asyncio.wait({load}, timeout=seconds)
    return bool(done)


def _openai_failure(error: MlxdError) -> list[bytes]:
    return [sse.data_frame(error.body())]


async def stream_when_loaded(
    load: asyncio.Future[LoadedModel],
    rec: RequestRecord,
    begin: Callable[[LoadedModel], Awaitable[AsyncIterator[bytes]]],
    interval: float,
    *,
    keepalive: bytes = sse.KEEPALIVE,
    failed: Callable[[MlxdError], list[bytes]] = _openai_failure,
) -> AsyncIterator[bytes]:
    """A stream whose model is still loading: ``keepalive`` frames (an SSE comment unless
    the API has its own, such as Anthropic's ping) every ``interval`` seconds while it loads,
    then ``begin(model)``'s frames. A failed load (or a request the loaded model rejects)
    ends the stream with the API's error frame (``failed``), since the status line is
    already sent."""
    rec.streaming = True
    try:
        while not await loaded_within(load, interval):
            yield keepalive
        body = await begin(load.result())
    except MlxdError as exc:
        rec.error = exc.code or exc.type
        for frame in failed(exc):
            yield frame
        rec.finish(exc.status)
        return
    except asyncio.CancelledError:
        rec.error = "client_disconnected"
        rec.finish(499)
        raise
    async for frame in body:
        yield frame
