"""The engine: one dedicated thread owns MLX, every loaded model and every MLX call.

MLX streams are thread-local, so every model is loaded, run and released on the same thread.
asyncio code talks to it through two one-way channels (types in :mod:`.protocol`):

* an inbox (``queue.SimpleQueue``) of commands: acquire a model, submit, cancel, configure
  the model table, set a keep-alive, retune, abort, stop. Every change of engine state is
  such a command, so the thread never sees a structure that the event loop is changing;
* per job, the :class:`JobHandle`'s ``asyncio.Queue`` of events (``Delta``, ``Finished``,
  ``Failed``), fed with ``loop.call_soon_threadsafe``.

Status goes the other way as a whole :class:`EngineStatus` snapshot the thread publishes
(one reference swap); the queue depth is a counter under a lock, because the queue bound has
to be checked on the event loop when a request arrives.

Several models (see :mod:`.residency` for the policies): each configured model has a
:class:`~.residency.Slot`; a loaded one has its own :class:`~mlxd.engine.batch.BatchRunner`
and :class:`~.promptcache.PromptCache` (a batch never mixes models; the cache is dropped with
its model). :meth:`Engine.acquire` loads a model on demand: concurrent first requests wait on
the same load, which runs once. Before a load, least recently used idle models are evicted
to stay within the memory budget; idle models unload after their ``keep_alive``; models with
running jobs take turns, one step each. An unload drops every reference to the model, clears
MLX's buffer cache and collects garbage, so the memory really returns (``model.unloaded``
logs MLX's active memory and the RSS before and after).

Reconfiguration (hot reload) is a command too: a removed model finishes its queued and
running jobs, then unloads; a model whose path, dtype or context length changed does the same
and then loads anew (jobs tokenized for the old load that had not started get a retryable
503); other entries are untouched apart from their new defaults. Batch slots per model
follow the table and the budget (:func:`mlxd.models.memory.plan`); a loaded model whose slots
change gets a new runner once it has no running job (:meth:`Engine._resize`), weights kept.

One piece: the thread's loop, its inbox commands and the residency decisions act on the same
state (slots, queue, status snapshot) on one thread; split, one state machine would be
spread over modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..config import EngineSettings, ModelSettings, Settings
from ..errors import (
    GenerationFailed,
    MlxdError,
    ModelLoadError,
    ModelUnavailable,
    NotSupported,
    Overloaded,
)
from ..logs import get_logger
from ..models.memory import MemoryEstimate
from .batch import BatchRunner, Job, batch_size, make_sampler, warm_up
from .diskcache import DiskCache, DiskView, model_identity
from .distributed import IDLE_TICK, Group, Watchdog, kv_weight
from .embed import EmbedTask
from .loader import LoadedModel
from .promptcache import CacheStats, PromptCache
from .protocol import (
    Delta,
    EngineStatus,
    Event,
    Failed,
    Finished,
    GenerationParams,
    GenerationRequest,
    JobHandle,
    LogitsProcessor,
)
from .residency import (
    ModelStatus,
    RoundRobin,
    Slot,
    expired,
    holders,
    memory_now,
    needs_reload,
    release_memory,
    resident,
)
from .residency import victims as choose_victims
from .score import ScoreTask

__all__ = [
    "Delta",
    "Engine",
    "EngineStatus",
    "Event",
    "Failed",
    "Finished",
    "GenerationParams",
    "GenerationRequest",
    "JobHandle",
    "LogitsProcessor",
    "ModelStatus",
    "make_sampler",
]

log = get_logger("mlxd.engine")


def _changed() -> ModelUnavailable:
    return ModelUnavailable("the model changed; retry", retry_after=1)


@dataclass(frozen=True)
class Residency:
    """The model table as the engine applies it: entries in config order (ids filled), the
    default id and the memory budget (0: derived from the device on the engine thread)."""

    entries: dict[str, ModelSettings]
    default_id: str
    budget_bytes: int = 0
    #: ``engine.max_batch_size``: a number, or "auto" (resolved per model by memory.plan).
    max_batch_size: int | str = "auto"

    @classmethod
    def from_settings(cls, settings: Settings) -> Residency:
        from ..models.registry import Router

        router = Router.from_settings(settings)
        engine = settings.engine
        return cls(
            router.entries, router.default_id, engine.memory_budget_bytes, engine.max_batch_size
        )

    @classmethod
    def single(cls, entry: ModelSettings, max_batch_size: int | str = "auto") -> Residency:
        from ..models.registry import derived_id

        entry_id = entry.id or derived_id(entry.path)
        entries = {entry_id: entry.model_copy(update={"id": entry_id})}
        return cls(entries, entry_id, max_batch_size=max_batch_size)


class Engine:
    """Owns the MLX thread. Entry points for the event loop: acquire, submit, status, retune,
    configure, set_keep_alive, request_load, abort_all, stop; each hands a command to the
    thread."""

    def __init__(
        self,
        models: ModelSettings | Residency,
        engine_settings: EngineSettings,
        state_dir: Path | None = None,
        group: Group | None = None,
    ) -> None:
        #: Rank 0 of a process group serving one sharded model (:mod:`.distributed`), or None.
        self.group = group
        self._handles: weakref.WeakValueDictionary[int, JobHandle] = weakref.WeakValueDictionary()
        self._residency = (
            models
            if isinstance(models, Residency)
            else Residency.single(models, engine_settings.max_batch_size)
        )
        self._state_dir = state_dir
        #: The event loop's copy (the queue bound is checked there); the thread gets its own
        #: through the inbox.
        self.settings = engine_settings
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="mlxd-engine", daemon=True)
        self._ids = itertools.count(1)
        self._waiting_lock = threading.Lock()
        self._waiting = 0  # submitted, not yet admitted or dropped
        self._stopping = False
        self._status = EngineStatus()
        self._outbox: list[tuple[JobHandle, Event]] = []  # engine thread: this step's events
        self._ended = False  # a job ended during this step
        self._signature: tuple[Any, ...] = ()  # what the published status was made from
        self.ready_event = threading.Event()
        self.on_loaded: list[Callable[[LoadedModel], None]] = []
        #: Called once the models to preload are loaded (or failed), with a status line, so
        #: a daemon whose models all load on demand still reports ready.
        self.on_ready: list[Callable[[str], None]] = []
        # -- engine-thread state (never touched from the event loop) --
        self._tuning = engine_settings
        self._jobs: dict[int, Job] = {}  # pending and running, by id
        self._slots: dict[str, Slot] = {}
        self._default_id = self._residency.default_id
        self._budget = self._residency.budget_bytes
        self._wanted: list[str] = []  # slots to load, in request order
        self._rr = RoundRobin()
        self._state = "loading"
        self._device: dict[str, str] = {}
        #: Embedding and scoring requests, one batch or chunk per loop turn.
        self._tasks: deque[EmbedTask | ScoreTask] = deque()
        #: Lookups per tier: plain counters, written by the engine thread, read by /health.
        self.cache_stats = CacheStats()
        #: The disk tier outlives models (one directory per model identity); thread-safe.
        self.disk_cache = DiskCache(
            self._disk_root(engine_settings), engine_settings.prompt_cache_disk_bytes
        )

    # -- called from the event loop (or any thread) -----------------------------------------
    def start(self) -> None:
        self._thread.start()
        if self.group is not None:
            Watchdog(self.group, self._hung).start()

    def _group_problem(self) -> ModelUnavailable | None:
        if self.group is not None and self.group.broken:
            error = self.group.status.error or "the model's process group is broken"
            return ModelUnavailable(error, retry_after=30)
        return None

    def _hung(self, error: str) -> None:
        """The watchdog's thread: a rank stopped answering and the engine thread waits on it.
        Every job still open gets the error now (from here: that thread is stuck)."""
        assert self.group is not None
        self.group.mark_broken(error)
        failure = self._group_problem()
        assert failure is not None
        self._fail_open(failure)

    def _fail_open(self, error: MlxdError) -> int:
        """From any thread: every job whose reader has not seen its end gets ``error`` now,
        without waiting for the engine thread (which may be inside a long step); how many."""
        with self._waiting_lock:
            handles = [h for h in self._handles.values() if h.open]
        for handle in handles:
            handle.deliver(Failed(error))
        return len(handles)

    def status(self) -> EngineStatus:
        """An immutable snapshot of the engine's state."""
        with self._waiting_lock:
            return replace(self._status, queue_depth=self._waiting)

    # Shorthands for readers of single fields (health, metrics, models routes).
    @property
    def current(self) -> LoadedModel | None:
        """The default model, when it is loaded."""
        return self._status.model

    @property
    def state(self) -> str:
        return self._status.state

    @property
    def load_error(self) -> str | None:
        return self._status.load_error

    @property
    def device(self) -> dict[str, str]:
        return dict(self._status.device)

    def queue_depth(self) -> int:
        return self.status().queue_depth

    def active_count(self) -> int:
        return self._status.active

    def models(self) -> tuple[ModelStatus, ...]:
        """Every configured model's state, in config order."""
        return self._status.models

    def require_model(self) -> LoadedModel:
        """The default model if it is loaded, or a 503 that tells the client to come back."""
        st = self._status
        if st.model is None or st.state != "ready":
            if st.state == "failed":
                raise ModelUnavailable(
                    f"the model could not be loaded: {st.load_error}", retry_after=30
                )
            raise ModelUnavailable("the model is loading; retry shortly", retry_after=2)
        return st.model

    def _disk_root(self, settings: EngineSettings) -> Path | None:
        """The disk tier's directory; None (tier off) for a relative one without a state dir."""
        path = Path(settings.prompt_cache_dir).expanduser()
        if not path.is_absolute():
            if self._state_dir is None:
                return None
            path = self._state_dir / path
        return path

    def cache_status(self) -> dict[str, dict[str, Any]]:
        """Prompt-cache hits, misses and bytes per tier (RAM: all loaded models together),
        for /health, /metrics, ``mlxd ps``."""
        stats, status = self.cache_stats, self._status
        return {
            "ram": {
                "hits": stats.ram_hits,
                "misses": stats.ram_misses,
                "bytes": status.prompt_cache_bytes,
                "entries": status.prompt_cache_entries,
                "budget_bytes": self.settings.prompt_cache_bytes,
            },
            "disk": {"hits": stats.disk_hits, "misses": stats.disk_misses}
            | self.disk_cache.usage(),
        }

    def acquire(self, model_id: str) -> Future[LoadedModel]:
        """The loaded model ``model_id``, loading it first if needed (concurrent callers share
        one load). Fails with a 503 :class:`ModelUnavailable` when it cannot be loaded or does
        not fit the memory budget (the next call tries again)."""
        fut: Future[LoadedModel] = Future()
        broken = self._group_problem()
        if self._stopping:
            fut.set_exception(ModelUnavailable("mlxd is shutting down", retry_after=5))
        elif broken is not None:
            fut.set_exception(broken)
        else:
            self._inbox.put(("acquire", (model_id, fut)))
        return fut

    def set_keep_alive(self, model_id: str, seconds: float) -> None:
        """A request's ``keep_alive``: the model's idle timeout from now on (0: never)."""
        self._inbox.put(("keep_alive", (model_id, seconds)))

    def configure(self, residency: Residency) -> None:
        """Apply a new model table (hot reload); see the module docstring."""
        self._inbox.put(("configure", residency))

    def retune(self, engine_settings: EngineSettings) -> None:
        """Apply live-tunable engine settings: the queue bound at once, the prompt-cache
        budget on the engine thread; prefill step and warm-up apply to the next runner (next
        model load). Batch slots come with the model table (:meth:`configure`)."""
        self.settings = engine_settings
        self._inbox.put(("retune", engine_settings))

    def submit(self, request: GenerationRequest) -> JobHandle:
        """Queue a generation; its events arrive on the returned handle. Call on the event
        loop. Raises 503 when shutting down or when the queue is full."""
        if self._stopping:
            raise ModelUnavailable("mlxd is shutting down", retry_after=5)
        broken = self._group_problem()
        if broken is not None:
            raise broken
        with self._waiting_lock:
            if self._waiting >= self.settings.max_queue:
                raise Overloaded(
                    f"too many requests waiting ({self.settings.max_queue}); retry shortly",
                    retry_after=2,
                )
            self._waiting += 1
        handle = JobHandle(next(self._ids), request, asyncio.get_running_loop(), self._cancel)
        with self._waiting_lock:
            self._handles[handle.id] = handle
        self._inbox.put(("submit", Job(handle.id, request, self._sender(handle))))
        return handle

    def _sender(self, handle: JobHandle) -> Callable[[Event], None]:
        """Queue ``event`` for ``handle`` in the outbox; :meth:`_flush` delivers it."""

        def send(event: Event) -> None:
            self._outbox.append((handle, event))
            if not isinstance(event, Delta):
                self._ended = True

        return send

    def _flush(self) -> None:
        """Deliver the step's events: one hop onto each event loop for all of them (not one
        per event: with 32 streams that is 32 self-pipe writes and wake-ups per token),
        after publishing the status if a job ended, so a client that got its Finished reads
        a status that already counts it as done.

        The caches of sequences that ended are stored between the two: the text goes out
        first (a 4k-token prompt's cache is a copy of tens to hundreds of MB, measured in
        docs/engine.md), the ends after, so the status a Finished reader sees counts them."""
        runners = (s.runner for s in self._slots.values())  # a runner's len() is its jobs
        kept = [r for r in runners if r is not None and r.has_kept]
        if kept:
            text = [item for item in self._outbox if isinstance(item[1], Delta)]
            if text:
                self._outbox = [item for item in self._outbox if not isinstance(item[1], Delta)]
                _deliver(text)
            for runner in kept:
                try:
                    runner.store_kept()
                except Exception as exc:  # a cache not kept must not end the thread
                    log.exception("prompt_cache.store_failed", error=str(exc))
        if self._ended:
            self._ended = False
            self._forget_done()
            self._publish()
        if not self._outbox:
            return
        batch, self._outbox = self._outbox, []
        _deliver(batch)

    def _cancel(self, job_id: int) -> None:
        self._inbox.put(("cancel", job_id))

    def embed(self, lm: LoadedModel, inputs: list[list[int]]) -> Future[Any]:
        """Embed token id lists with ``lm`` on the engine thread, one batch between decode
        steps; the future gets one unit-length float32 row per input."""
        if self._stopping:
            raise ModelUnavailable("mlxd is shutting down", retry_after=5)
        self._refuse_in_group("embeddings")
        fut: Future[Any] = Future()
        self._inbox.put(("task", EmbedTask(lm, inputs, fut)))
        return fut

    def score(self, lm: LoadedModel, prompt: list[int], k: int) -> Future[Any]:
        """The logprob of every prompt token after the first (and ``k`` alternatives), on
        the engine thread, one chunk between decode steps."""
        if self._stopping:
            raise ModelUnavailable("mlxd is shutting down", retry_after=5)
        self._refuse_in_group("prompt logprobs (echo)")
        fut: Future[Any] = Future()
        self._inbox.put(("task", ScoreTask(lm, prompt, k, fut)))
        return fut

    def _refuse_in_group(self, what: str) -> None:
        if self.group is not None:
            raise NotSupported(f"{what} are not served by a model split across ranks")

    def abort_all(self, error: MlxdError) -> int:
        """End every waiting and running job with ``error`` (shutdown budget spent); returns
        how many were open. Their readers get the error at once, even while the engine thread
        is inside a long step (one prefill chunk takes seconds on a slow CPU), so a stream
        ends with its error frame within the budget; the thread drops the jobs after it."""
        self._inbox.put(("abort", error))
        return self._fail_open(error)

    def request_load(self, settings: ModelSettings) -> Future[LoadedModel]:
        """Load ``settings`` anew under its id (the default model's when it has none): its
        running jobs finish first; the future resolves when it serves (or fails to load)."""
        fut: Future[LoadedModel] = Future()
        self._inbox.put(("reload", (settings, fut)))
        return fut

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread: waiting and running jobs get a 503 error."""
        self._stopping = True
        self._inbox.put(("stop", None))
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.disk_cache.close()

    async def collect(self, job: JobHandle) -> AsyncIterator[Event]:
        """The job's events until Finished or Failed; leaving early cancels the job."""
        try:
            while True:
                event = await job.next_event(None)
                assert event is not None
                yield event
                if isinstance(event, Finished | Failed):
                    return
        finally:
            job.cancel()

    # -- engine thread --------------------------------------------------------------------
    def _run(self) -> None:
        from .. import backend
        from ..models.memory import default_budget

        if self.group is not None:
            self.group.init()  # on this thread: every collective runs here
        self._device = backend.device_info()
        self._apply_cache_limit()
        if not self._budget:
            self._budget = default_budget(self._device["device"], self._device["backend"])
        self._apply(self._residency)
        for first in list(self._slots.values()):
            if first.entry.preload:
                self._load(first, preload=True)
        self._state = "ready"
        self._publish()
        loaded = [s.id for s in self._slots.values() if s.state == "loaded"]
        for callback in self.on_ready:
            callback("serving " + (", ".join(loaded) or "(models load on demand)"))
        while True:
            busy = bool(self._tasks) or any(
                s.running() or (s.pending and s.state == "loaded") for s in self._slots.values()
            )
            if not self._drain_inbox(block=not busy and not self._wanted):
                break
            slot: Slot | None = None
            try:
                self._resize()
                self._load_wanted()
                self._admit()  # in a group, the watchdog times each broadcast
                slot = self._rr.pick(self._slots)
                if slot is not None:
                    with self._timed():
                        slot.runner.step()
                    slot.touch()  # idle time counts from the end of the last request
                if self._tasks:
                    self._task_step()
            except Exception as exc:  # an MLX failure must not kill the thread
                log.exception("engine.step_failed", error=str(exc))
                if self.group is not None:
                    self._break(str(exc))
                elif slot is not None:
                    self._renew_runner(slot, GenerationFailed(f"generation failed: {exc}"))
            self._retire()
            # A job submitted during the step (its model acquired before it) counts as work.
            if not self._drain_inbox(block=False):
                break
            for idle in expired(self._slots, time.monotonic()):
                self._unload(idle, "idle")
            self._flush()
            if self._status_signature() != self._signature:
                self._publish()
        self._shutdown_jobs()
        if self.group is not None and not self.group.broken:
            with contextlib.suppress(RuntimeError):
                self.group.send(("stop",))
        self._flush()

    @contextlib.contextmanager
    def _timed(self) -> Iterator[None]:
        """In a group: the watchdog times this step (one decode step, or one prefill chunk;
        a model load is not timed: a peer that dies makes it raise)."""
        if self.group is not None:
            self.group.busy_since = time.time()
        try:
            yield
        finally:
            if self.group is not None:
                self.group.busy_since = None

    def _idle_tick(self) -> None:
        """An idle group's heartbeat: the followers sleep between these instead of waiting
        in a collective, which the ring backend waits for by polling (a full core each)."""
        assert self.group is not None
        try:
            self.group.send(("idle",))
        except RuntimeError as exc:
            self._break(str(exc))

    def _break(self, error: str) -> None:
        """The group lost a rank (a collective raised): fail everything, serve 503 from now."""
        assert self.group is not None
        self.group.mark_broken(error)
        failure = self._group_problem()
        assert failure is not None
        for s in self._slots.values():
            if s.runner is not None:
                s.runner.fail_all_local(failure)
            self._fail_waiting(s, failure)
            if s.state == "loaded":
                s.state, s.error = "failed", failure.message
        self._publish()

    def _status_signature(self) -> tuple[Any, ...]:
        """What the published status shows, cheaply (checked every step; last use to the
        second, so a busy model's idle time is republished once a second, not per token)."""
        return (
            self._state,
            self._budget,
            tuple(
                (
                    s.id,
                    s.state,
                    s.lm is None,
                    s.running(),
                    len(s.pending) + len(s.waiters),
                    s.error,
                    s.keep_alive,
                    int(s.last_used),
                    len(s.prompt_cache) if s.prompt_cache is not None else 0,
                    s.runner.slots if s.runner is not None else None,
                    s.estimate,
                )
                for s in self._slots.values()
            ),
        )

    def _publish(self) -> None:
        self._signature = self._status_signature()
        slots = list(self._slots.values())
        default = self._slots.get(self._default_id)
        models = tuple(s.status(self._default_id) for s in slots)
        state = self._state
        if state == "ready" and default is not None and default.state == "failed":
            state = "failed"
        cache = [s.prompt_cache for s in slots if s.prompt_cache is not None]
        self._status = EngineStatus(
            state=state,
            model=default.lm if default is not None else None,
            active=sum(s.running() for s in slots),
            device=tuple(self._device.items()),
            load_error=default.error if default is not None else None,
            prompt_cache_entries=sum(len(c) for c in cache),
            prompt_cache_bytes=sum(c.nbytes for c in cache),
            models=models,
            budget_bytes=self._budget,
            used_bytes=sum(s.cost() for s in slots if s.state in ("loaded", "loading")),
        )

    def _drain_inbox(self, block: bool) -> bool:
        """Handle commands; returns False when the thread must end."""
        while True:
            if not block and self._inbox.empty():
                return True
            try:
                wait = 0.5 if self.group is None else IDLE_TICK
                cmd, arg = self._inbox.get(timeout=wait) if block else self._inbox.get_nowait()
            except queue.Empty:
                if block and self.group is not None and not self.group.broken:
                    self._idle_tick()
                return True
            block = False
            if cmd == "stop":
                return False
            if cmd == "submit":
                self._enqueue(arg)
            elif cmd == "acquire":
                self._acquire(*arg)
            elif cmd == "cancel":
                try:
                    self._cancel_job(arg)
                except RuntimeError as exc:  # a group's broadcast found a rank gone
                    if self.group is None:
                        raise
                    self._break(str(exc))
            elif cmd == "task":
                self._tasks.append(arg)
            elif cmd == "keep_alive":
                found = self._slots.get(arg[0])
                if found is not None and self.group is None:  # a group's model stays
                    found.keep_alive = arg[1]
            elif cmd == "retune":
                self._tuning = arg
                if self.group is not None and not self.group.broken:
                    self.group.send(("retune", arg.prompt_cache_bytes))
                for s in self._slots.values():
                    if s.prompt_cache is not None:
                        s.prompt_cache.resize(arg.prompt_cache_bytes)
                self.disk_cache.configure(self._disk_root(arg), arg.prompt_cache_disk_bytes)
                self._apply_cache_limit()
            elif cmd == "configure":
                self._apply(arg)
            elif cmd == "reload":
                self._reload(*arg)
            elif cmd == "abort":
                for s in self._slots.values():
                    if s.runner is not None:
                        s.runner.fail_all(arg)
                    self._fail_waiting(s, arg)

    def _apply_cache_limit(self) -> None:
        """Cap MLX's buffer cache: freed buffers it keeps for reuse would otherwise grow
        toward the memory limit."""
        import mlx.core as mx

        mx.set_cache_limit(self._tuning.mlx_cache_limit_bytes)

    def _disk_view(self, lm: LoadedModel) -> DiskView | None:
        """The disk tier for ``lm`` (its directory is indexed now), or None if it cannot be
        (nor in a group: each rank's cache holds its own shard)."""
        if self.group is not None:
            return None
        try:
            return self.disk_cache.view(model_identity(lm))
        except OSError as exc:
            log.warning("prompt_cache.disk_unavailable", error=str(exc))
            return None

    # -- the table ------------------------------------------------------------------------
    def _apply(self, residency: Residency) -> None:
        """Add, change and retire slots to match ``residency`` (see the module docstring)."""
        if self.group is not None:  # one model, loaded with the group and kept
            entry = residency.entries[residency.default_id]
            kept = entry.model_copy(update={"preload": True, "keep_alive": 0, "pinned": True})
            residency = replace(residency, entries={residency.default_id: kept})
        self._residency = residency
        self._default_id = residency.default_id
        if residency.budget_bytes:
            self._budget = residency.budget_bytes
        elif self._device:  # 0: derived from the device (again, if it was set before)
            from ..models.memory import default_budget

            self._budget = default_budget(self._device["device"], self._device["backend"])
        for entry_id, entry in residency.entries.items():
            slot = self._slots.get(entry_id)
            if slot is None or slot.removed:
                if slot is not None:  # removed, still draining, and now back: a fresh slot
                    slot.removed = False
                    slot.entry = entry
                    continue
                slot = Slot(entry)
                self._slots[entry_id] = slot
                if entry.preload and self._state == "ready":
                    self._want(slot)
                continue
            reload = needs_reload(slot.entry, entry)
            if slot.entry.keep_alive != entry.keep_alive:
                slot.keep_alive = entry.keep_alive
            slot.entry = entry
            if reload:
                slot.weights_bytes = None
                slot.generation += 1
                if slot.state == "loaded":
                    slot.stale = True  # _retire unloads it when its work is done
                elif entry.preload:
                    self._want(slot)
        for slot in self._slots.values():
            if slot.id not in residency.entries:
                slot.removed = True
        # Rebuild in config order (removed ones, still draining, go last).
        self._slots = {
            **{i: self._slots[i] for i in residency.entries},
            **{i: s for i, s in self._slots.items() if i not in residency.entries},
        }
        self._plan()

    def _plan(self, also: Slot | None = None) -> None:
        """Each model's memory estimate and batch slots, from the table and the budget
        (:func:`mlxd.models.memory.plan`), as ``planned``. A model that is loaded or loading
        keeps counting at the slots its runner was built with (``estimate``) until
        :meth:`_resize` rebuilds it, unless it is ``also``."""
        from ..models.memory import plan

        entries = {s.id: s.entry for s in self._slots.values() if not s.removed}
        device, backend_name = self._device["device"], self._device["backend"]
        planned = plan(entries, self._residency.max_batch_size, device, backend_name, self._budget)
        for slot_id, est in planned.items():
            slot = self._slots[slot_id]
            slot.planned = est
            if slot is also or slot.state not in ("loaded", "loading"):
                slot.estimate = est

    def _tuned(self, slot: Slot) -> EngineSettings:
        """The engine settings with ``max_batch_size`` resolved to ``slot``'s batch slots (a
        model not sized yet: see :func:`~.batch.batch_size`)."""
        est = slot.estimate
        slots = est.slots if est is not None else batch_size(self._tuning)
        return self._tuning.model_copy(update={"max_batch_size": slots})

    def _fitting(self, slot: Slot, est: MemoryEstimate, least: int) -> MemoryEstimate:
        """``est`` cut to the slots that fit beside the other resident models, but not below
        ``least``."""
        per = est.kv_bytes // est.slots
        others = sum(s.cost() for s in resident(self._slots) if s is not slot)
        room = self._budget - others - (slot.weights_bytes or est.weights_bytes)
        fit = max(least, min(est.slots, room // max(1, per)))
        return replace(est, kv_bytes=per * fit, slots=fit)

    def _resize(self) -> None:
        """A loaded model whose planned batch slots changed (``max_batch_size``, the budget or
        the models beside it did) gets a runner with the new slots once it has no running
        sequence: its weights stay, its prompt cache too; the warm-up runs again for the new
        batch sizes. Not in a process group (the followers' runners would differ)."""
        if self.group is not None:
            return
        for slot in self._slots.values():
            est, runner, lm = slot.planned, slot.runner, slot.lm
            if slot.state != "loaded" or est is None or runner is None or lm is None:
                continue
            if est.slots == runner.slots or runner.active or slot.prompt_cache is None:
                continue
            if est.slots > runner.slots:  # grow only into memory the others leave free
                est = self._fitting(slot, est, least=runner.slots)
                if est.slots == runner.slots:
                    continue
            runner.store_kept()
            runner.close()
            slot.estimate = est
            tuned = self._tuned(slot)
            warm = warm_up(lm, tuned, slot.entry.temperature, slot.entry.top_p)
            slot.runner = BatchRunner(lm, tuned, slot.prompt_cache)
            log.info(
                "model.resized",
                id=slot.id,
                max_batch_size=est.slots,
                was=runner.slots,
                warmup_seconds=round(warm, 3),
            )

    def _fit_loaded(self, slot: Slot) -> None:
        """After loading a model that could not be sized before (its files were not here):
        evict idle models it does not fit beside, else keep to the slots that fit."""
        est = slot.estimate
        chosen = choose_victims(self._slots, slot, self._budget)
        for victim in chosen or []:
            self._unload(victim, "evicted")
        if chosen is not None or est is None or est.slots <= 1:
            return
        slot.estimate = self._fitting(slot, est, least=1)

    def _reload(self, settings: ModelSettings, fut: Future[LoadedModel]) -> None:
        entry_id = settings.id or self._default_id
        slot = self._slots.get(entry_id)
        if slot is None:
            fut.set_exception(ModelLoadError(f"no configured model {entry_id!r}"))
            return
        slot.entry = settings.model_copy(update={"id": entry_id})
        slot.generation += 1
        if slot.state == "loaded":
            slot.stale = True
        slot.waiters.append(fut)
        self._want(slot)

    def _retire(self) -> None:
        """Removed and changed models whose work is done: unload (and load changed anew)."""
        for slot in list(self._slots.values()):
            if slot.removed and not slot.running() and not slot.pending:
                if slot.state == "loaded":
                    self._unload(slot, "removed")
                self._fail_waiting(slot, ModelUnavailable(f"model {slot.id!r} was removed"))
                del self._slots[slot.id]
            elif slot.stale and not slot.running():
                self._drop_stale_pending(slot)
                if not slot.pending:
                    self._unload(slot, "changed")
                    if slot.waiters or slot.pending or slot.entry.preload:
                        self._want(slot)

    # -- jobs -----------------------------------------------------------------------------
    def _slot_of(self, job: Job) -> Slot | None:
        return self._slots.get(job.request.model.id)

    def _enqueue(self, job: Job) -> None:
        slot = self._slot_of(job)
        if slot is None or (slot.removed and job.request.model is not slot.lm):
            self._drop_pending(
                job, Failed(ModelUnavailable("the model was removed", retry_after=1))
            )
            return
        if not self._fits(job, slot):
            self._drop_pending(job, Failed(_changed()))
            return
        self._jobs[job.id] = job
        slot.pending.append(job)
        slot.touch()
        if slot.state != "loaded":
            self._want(slot)

    def _acquire(self, model_id: str, fut: Future[LoadedModel]) -> None:
        slot = self._slots.get(model_id)
        if slot is None or slot.removed:
            error = ModelUnavailable(f"model {model_id!r} is not configured", retry_after=1)
            fut.set_exception(error)
            return
        slot.touch()
        if slot.state == "loaded" and not slot.stale and slot.lm is not None:
            fut.set_result(slot.lm)
            return
        slot.waiters.append(fut)
        if not slot.stale:
            self._want(slot)

    def _want(self, slot: Slot) -> None:
        if slot.id not in self._wanted:
            self._wanted.append(slot.id)

    def _load_wanted(self) -> None:
        while self._wanted:
            slot = self._slots.get(self._wanted.pop(0))
            if slot is None or slot.stale or slot.removed:
                continue
            if slot.state == "loaded":
                self._resolve_waiters(slot)
                continue
            self._load(slot)

    def _cancel_job(self, job_id: int) -> None:
        job = self._jobs.pop(job_id, None)
        if job is None or job.done:
            return
        job.cancelled = True
        slot = self._slot_of(job)
        if slot is not None and job in slot.pending:
            slot.pending.remove(job)
            self._drop_pending(job, None)
        elif slot is not None and slot.runner is not None:
            slot.runner.remove(job)
        log.debug("job.cancelled", uid=job.uid)

    def _drop_pending(self, job: Job, event: Event | None) -> None:
        """``job`` leaves the queue without running (cancelled, stale or aborted)."""
        with self._waiting_lock:
            self._waiting -= 1
        job.done = True
        if event is not None:
            job.send(event)

    def _drop_stale_pending(self, slot: Slot) -> None:
        """Jobs tokenized for neither the loaded model nor the new config: retryable 503."""
        for job in [j for j in slot.pending if not self._fits(j, slot)]:
            slot.pending.remove(job)
            self._drop_pending(job, Failed(_changed()))

    @staticmethod
    def _fits(job: Job, slot: Slot) -> bool:
        """``job`` was tokenized for the loaded model, or for a load of the current config."""
        lm = job.request.model
        return lm is slot.lm or lm.revision == slot.generation

    def _fail_waiting(self, slot: Slot, error: MlxdError) -> None:
        """Requests waiting for ``slot`` (a load or a batch slot) get ``error``."""
        while slot.pending:
            self._drop_pending(slot.pending.popleft(), Failed(error))
        for fut in slot.waiters:
            if not fut.done():
                fut.set_exception(error)
        slot.waiters.clear()

    def _task_step(self) -> None:
        """One batch or chunk of the oldest embedding or scoring request (its model must be
        the loaded one); a bad input or an MLX failure ends that request only."""
        task = self._tasks[0]
        slot = self._slots.get(task.lm.id)
        try:
            if slot is None or slot.lm is not task.lm:
                raise ModelUnavailable("the model changed; retry", retry_after=1)
            slot.touch()
            finished = task.step()
        except Exception as exc:
            finished = True
            if not isinstance(exc, MlxdError):
                log.exception("engine.task_failed", error=str(exc))
                exc = GenerationFailed(f"{type(task).__name__} failed: {exc}")
            if not task.future.cancelled():
                task.future.set_exception(exc)
        if finished:
            self._tasks.popleft()

    def _forget_done(self) -> None:
        if any(j.done for j in self._jobs.values()):
            self._jobs = {k: j for k, j in self._jobs.items() if not j.done}

    def _admit(self) -> None:
        admitted = False
        for slot in self._slots.values():
            runner = slot.runner
            if runner is None or slot.state != "loaded":
                continue
            while slot.pending and runner.free_slots > 0:
                job = slot.pending[0]
                same = job.request.model is slot.lm
                if slot.stale and not same:
                    break  # waits for the new load
                if not self._fits(job, slot):
                    slot.pending.popleft()
                    self._drop_pending(job, Failed(_changed()))
                    continue
                slot.pending.popleft()
                with self._waiting_lock:
                    self._waiting -= 1
                slot.touch()
                runner.add(job)
                admitted = True
        if admitted:
            # Counted as running from now: the step that follows may be a prefill chunk that
            # takes seconds, and no longer waiting, a job must not vanish from the status
            # (/health, metrics, the shutdown's count of what it cancels) until then.
            self._publish()

    def _renew_runner(self, slot: Slot, error: MlxdError) -> None:
        """After a failed step: end the running jobs and start from a fresh runner."""
        if slot.runner is None or slot.lm is None or slot.prompt_cache is None:
            return
        slot.runner.fail_all(error)
        slot.runner.close()
        slot.runner = BatchRunner(slot.lm, self._tuned(slot), slot.prompt_cache)

    # -- loading and unloading ----------------------------------------------------------------
    def _load(self, slot: Slot, *, preload: bool = False) -> None:
        from . import loader

        broken = self._group_problem()
        if broken is not None:
            self._fail_waiting(slot, broken)
            return
        self._plan(also=slot)
        chosen = choose_victims(self._slots, slot, self._budget)
        if chosen is None:
            msg = (
                f"not enough memory to load {slot.id!r} (needs ~{slot.cost() / 1e6:.0f} MB of "
                f"the {self._budget / 1e6:.0f} MB budget, engine.memory_budget_bytes); held by: "
                f"{holders(self._slots, slot)}. Retry when they are idle"
            )
            log.warning("model.load_refused", id=slot.id, reason="memory_budget", error=msg)
            self._fail_waiting(slot, ModelUnavailable(msg, retry_after=5))
            return
        for victim in chosen:
            self._unload(victim, "evicted")
        slot.state = "loading"
        self._publish()
        log.info(
            "model.loading",
            id=slot.id,
            path=slot.entry.path,
            estimate_bytes=slot.cost(),
            budget_bytes=self._budget,
            max_batch_size=self._tuned(slot).max_batch_size,
            preload=preload,
        )
        try:
            if self.group is not None:  # every rank loads its shard of the same entry
                slots = self._tuned(slot).max_batch_size
                self.group.send(("load", slot.entry.model_dump(), slots))
                lm = loader.load(slot.entry, group=self.group)
                warm = 0.0  # warm-up would step without the followers
            else:
                lm = loader.load(slot.entry)
                if slot.estimate is None:  # its files are here now: size it
                    self._plan(also=slot)
                    slot.weights_bytes = _weights_bytes(lm)
                    self._fit_loaded(slot)
                tuned = self._tuned(slot)
                warm = warm_up(lm, tuned, slot.entry.temperature, slot.entry.top_p)
        except (ModelLoadError, MemoryError) as exc:
            self._load_failed(slot, str(exc), log_exc=False)
            return
        except Exception as exc:  # a bug or an unexpected file: report, keep running
            self._load_failed(slot, f"{type(exc).__name__}: {exc}", log_exc=True)
            return
        lm.revision = slot.generation
        slot.lm = lm
        slot.weights_bytes = _weights_bytes(lm)
        slot.prompt_cache = PromptCache(self._tuning.prompt_cache_bytes, stats=self.cache_stats)
        slot.prompt_cache.disk = self._disk_view(lm)
        if self.group is not None:
            slot.prompt_cache.weigh = kv_weight(lm.config)
        slot.runner = BatchRunner(lm, self._tuned(slot), slot.prompt_cache, self.group)
        slot.state = "loaded"
        slot.error = None
        slot.stale = False
        slot.loaded_at = time.time()
        slot.load_seconds = lm.load_seconds + warm
        slot.touch()
        self._publish()
        log.info(
            "model.loaded",
            **lm.describe(),
            warmup_seconds=round(warm, 3),
            weights_bytes=slot.weights_bytes,
            max_batch_size=slot.runner.slots,
            **memory_now(),
            **self._device,
        )
        for callback in self.on_loaded:
            callback(lm)
        if slot.id == self._default_id:
            self.ready_event.set()
        self._resolve_waiters(slot)

    def _resolve_waiters(self, slot: Slot) -> None:
        for fut in slot.waiters:
            if not fut.done() and slot.lm is not None:
                fut.set_result(slot.lm)
        slot.waiters.clear()

    def _load_failed(self, slot: Slot, message: str, *, log_exc: bool) -> None:
        slot.state = "failed"
        slot.error = message
        (log.exception if log_exc else log.error)(
            "model.load_failed", id=slot.id, path=slot.entry.path, error=message
        )
        self._publish()
        self._fail_waiting(
            slot,
            ModelUnavailable(f"model {slot.id!r} could not be loaded: {message}", retry_after=5),
        )

    def _unload(self, slot: Slot, reason: str) -> None:
        """Drop every reference to the model, then give MLX's memory back."""
        before = memory_now()
        if slot.runner is not None:
            slot.runner.fail_all(ModelUnavailable("the model was unloaded; retry", retry_after=1))
            slot.runner.close()
        if slot.prompt_cache is not None:
            slot.prompt_cache.clear()
        slot.runner = slot.prompt_cache = slot.lm = None
        slot.state = "unloaded"
        slot.stale = False
        slot.loaded_at = None
        self._publish()  # the published status held the model too
        release_memory()
        after = memory_now()
        log.info(
            "model.unloaded",
            id=slot.id,
            reason=reason,
            active_bytes_before=before["active_bytes"],
            active_bytes=after["active_bytes"],
            rss_bytes_before=before["rss_bytes"],
            rss_bytes=after["rss_bytes"],
        )

    def _shutdown_jobs(self) -> None:
        error = ModelUnavailable("mlxd is shutting down", retry_after=5)
        for slot in self._slots.values():
            if slot.runner is not None:
                slot.runner.fail_all(error)
            self._fail_waiting(slot, error)
        while self._tasks:
            task = self._tasks.popleft()
            if not task.future.cancelled():
                task.future.set_exception(error)
        self._state = "stopped"
        self._publish()


def _weights_bytes(lm: LoadedModel) -> int:
    """The loaded model's weights, measured."""
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(lm.model.parameters()))


def _deliver(batch: list[tuple[JobHandle, Event]]) -> None:
    """One hop onto each event loop for all of ``batch``'s events, in order."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[JobHandle, Event]]] = {}
    for handle, event in batch:
        by_loop.setdefault(handle.loop, []).append((handle, event))
    for loop, events in by_loop.items():
        # RuntimeError: the event loop is gone (shutdown); nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_dispatch, events)


def _dispatch(events: list[tuple[JobHandle, Event]]) -> None:
    """On the event loop: hand each event to its job's queue, in order."""
    for handle, event in events:
        handle.deliver_now(event)
