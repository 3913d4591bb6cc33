"""The engine: one dedicated thread owns MLX, the model and every MLX call.

MLX streams are thread-local, so the model is loaded and run on the same thread for its whole
life. asyncio code talks to it through two one-way channels (types in :mod:`.protocol`):

* an inbox (``queue.SimpleQueue``) of commands: submit, cancel, load a model, retune, abort,
  stop. Every change of engine state is such a command, so the thread never sees a
  structure that the event loop is changing under it;
* per job, the :class:`JobHandle`'s ``asyncio.Queue`` of events (``Delta``, ``Finished``,
  ``Failed``), fed with ``loop.call_soon_threadsafe``.

Status goes the other way as a whole :class:`EngineStatus` snapshot the thread publishes
(one reference swap); the queue depth is a counter under a lock, because the queue bound has
to be checked on the event loop when a request arrives.

Generation runs in a :class:`~mlxd.engine.batch.BatchRunner` (one per loaded model). The
thread drains the inbox between any two steps of it (a decode step or one prefill chunk), so a
cancel takes effect at the next token or the next prefill chunk.

A model switch is a command on the same thread: new jobs wait, in-flight ones get
``SWITCH_GRACE_SECONDS`` to finish and are then ended with a clear 503 error, the new model is
loaded (on failure the old one keeps serving), and jobs tokenized for the old model are
answered with a 503 the OpenAI SDK retries by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..config import EngineSettings, ModelSettings
from ..errors import GenerationFailed, MlxdError, ModelLoadError, ModelUnavailable, Overloaded
from ..logs import get_logger
from .batch import BatchRunner, Job, make_sampler, warm_up
from .diskcache import DiskCache, DiskView, model_identity
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
    "make_sampler",
]

log = get_logger("mlxd.engine")

#: How long in-flight generations may run on after a model switch was asked for.
SWITCH_GRACE_SECONDS = 5.0


class Engine:
    """Owns the MLX thread. Entry points for the event loop: submit, status, retune,
    request_load, abort_all, stop; each hands a command to the thread."""

    def __init__(
        self,
        model_settings: ModelSettings,
        engine_settings: EngineSettings,
        state_dir: Path | None = None,
    ) -> None:
        self._model_settings = model_settings
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
        self.ready_event = threading.Event()
        self.on_loaded: list[Callable[[LoadedModel], None]] = []
        # -- engine-thread state (never touched from the event loop) --
        self._tuning = engine_settings
        self._pending: deque[Job] = deque()
        self._jobs: dict[int, Job] = {}  # pending and running, by id
        self._runner: BatchRunner | None = None
        self._load_request: tuple[ModelSettings, Future[LoadedModel], float] | None = None
        self._current: LoadedModel | None = None
        self._state = "loading"
        self._load_error: str | None = None
        self._device: dict[str, str] = {}
        #: Embedding and scoring requests, one batch or chunk per loop turn.
        self._tasks: deque[EmbedTask | ScoreTask] = deque()
        #: Lookups per tier: plain counters, written by the engine thread, read by /health.
        self.cache_stats = CacheStats()
        #: The disk tier outlives models (one directory per model identity); thread-safe.
        self.disk_cache = DiskCache(
            self._disk_root(engine_settings), engine_settings.prompt_cache_disk_bytes
        )
        self._prompt_cache = PromptCache(engine_settings.prompt_cache_bytes, stats=self.cache_stats)

    # -- called from the event loop (or any thread) -----------------------------------------
    def start(self) -> None:
        self._thread.start()

    def status(self) -> EngineStatus:
        """An immutable snapshot of the engine's state."""
        with self._waiting_lock:
            return replace(self._status, queue_depth=self._waiting)

    # Shorthands for readers of single fields (health, metrics, models routes).
    @property
    def current(self) -> LoadedModel | None:
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

    def require_model(self) -> LoadedModel:
        """The model to tokenize for, or a 503 that tells the client to come back."""
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
        """Prompt-cache hits, misses and bytes per tier, for /health, /metrics, ``mlxd ps``."""
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

    def retune(self, engine_settings: EngineSettings) -> None:
        """Apply live-tunable engine settings: the queue bound at once, the prompt-cache
        budget on the engine thread; batch size and prefill step apply to the next runner
        (next model load)."""
        self.settings = engine_settings
        self._inbox.put(("retune", engine_settings))

    def submit(self, request: GenerationRequest) -> JobHandle:
        """Queue a generation; its events arrive on the returned handle. Call on the event
        loop. Raises 503 when shutting down or when the queue is full."""
        if self._stopping:
            raise ModelUnavailable("mlxd is shutting down", retry_after=5)
        with self._waiting_lock:
            if self._waiting >= self.settings.max_queue:
                raise Overloaded(
                    f"too many requests waiting ({self.settings.max_queue}); retry shortly",
                    retry_after=2,
                )
            self._waiting += 1
        handle = JobHandle(next(self._ids), request, asyncio.get_running_loop(), self._cancel)
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
        a status that already counts it as done."""
        if self._ended:
            self._ended = False
            self._forget_done()
            self._publish()
        if not self._outbox:
            return
        batch, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[JobHandle, Event]]] = {}
        for handle, event in batch:
            by_loop.setdefault(handle.loop, []).append((handle, event))
        for loop, events in by_loop.items():
            # RuntimeError: the event loop is gone (shutdown); nobody is listening any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_dispatch, events)

    def _cancel(self, job_id: int) -> None:
        self._inbox.put(("cancel", job_id))

    def embed(self, lm: LoadedModel, inputs: list[list[int]]) -> Future[Any]:
        """Embed token id lists with ``lm`` on the engine thread, one batch between decode
        steps; the future gets one unit-length float32 row per input."""
        if self._stopping:
            raise ModelUnavailable("mlxd is shutting down", retry_after=5)
        fut: Future[Any] = Future()
        self._inbox.put(("task", EmbedTask(lm, inputs, fut)))
        return fut

    def score(self, lm: LoadedModel, prompt: list[int], k: int) -> Future[Any]:
        """The logprob of every prompt token after the first (and ``k`` alternatives), on
        the engine thread, one chunk between decode steps."""
        if self._stopping:
            raise ModelUnavailable("mlxd is shutting down", retry_after=5)
        fut: Future[Any] = Future()
        self._inbox.put(("task", ScoreTask(lm, prompt, k, fut)))
        return fut

    def abort_all(self, error: MlxdError) -> None:
        """End every waiting and running job with ``error`` (shutdown budget spent)."""
        self._inbox.put(("abort", error))

    def request_load(self, settings: ModelSettings) -> Future[LoadedModel]:
        """Switch to another model; the future resolves when it serves (or fails to load)."""
        fut: Future[LoadedModel] = Future()
        self._inbox.put(("load", (settings, fut)))
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

        self._device = backend.device_info()
        self._apply_cache_limit()
        self._load(self._model_settings, None)
        while True:
            busy = (self._runner is not None and len(self._runner) > 0) or bool(self._tasks)
            block = not busy and not (self._pending and self._state == "ready")
            if not self._drain_inbox(block):
                break
            try:
                self._maybe_switch()
                self._admit()
                if self._runner is not None and len(self._runner):
                    self._runner.step()
                if self._tasks:
                    self._task_step()
            except Exception as exc:  # an MLX failure must not kill the thread
                log.exception("engine.step_failed", error=str(exc))
                self._renew_runner(GenerationFailed(f"generation failed: {exc}"))
            self._flush()
            if self._changed():
                self._publish()
        self._shutdown_jobs()
        self._flush()

    def _changed(self) -> bool:
        """Whether the published status is out of date (cheap: checked every step)."""
        st = self._status
        runner = self._runner
        return (
            st.state != self._state
            or st.model is not self._current
            or st.active != (len(runner) if runner is not None else 0)
            or st.load_error != self._load_error
            or st.prompt_cache_entries != len(self._prompt_cache)
        )

    def _publish(self) -> None:
        runner = self._runner
        self._status = EngineStatus(
            state=self._state,
            model=self._current,
            active=len(runner) if runner is not None else 0,
            device=tuple(self._device.items()),
            load_error=self._load_error,
            prompt_cache_entries=len(self._prompt_cache),
            prompt_cache_bytes=self._prompt_cache.nbytes,
        )

    def _drain_inbox(self, block: bool) -> bool:
        """Handle commands; returns False when the thread must end."""
        while True:
            if not block and self._inbox.empty():
                return True
            try:
                cmd, arg = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                return True
            block = False
            if cmd == "stop":
                return False
            if cmd == "submit":
                self._jobs[arg.id] = arg
                self._pending.append(arg)
            elif cmd == "cancel":
                self._cancel_job(arg)
            elif cmd == "task":
                self._tasks.append(arg)
            elif cmd == "retune":
                self._tuning = arg
                self._prompt_cache.resize(arg.prompt_cache_bytes)
                self.disk_cache.configure(self._disk_root(arg), arg.prompt_cache_disk_bytes)
                self._apply_cache_limit()
            elif cmd == "abort":
                if self._runner is not None:
                    self._runner.fail_all(arg)
                while self._pending:
                    self._drop_pending(self._pending.popleft(), Failed(arg))
            elif cmd == "load":
                settings, fut = arg
                if self._load_request is not None:  # a newer edit wins over an older one
                    self._load_request[1].cancel()
                self._load_request = (settings, fut, time.monotonic() + SWITCH_GRACE_SECONDS)

    def _apply_cache_limit(self) -> None:
        """Cap MLX's buffer cache: freed buffers it keeps for reuse would otherwise grow
        toward the memory limit."""
        import mlx.core as mx

        mx.set_cache_limit(self._tuning.mlx_cache_limit_bytes)

    def _cancel_job(self, job_id: int) -> None:
        job = self._jobs.pop(job_id, None)
        if job is None or job.done:
            return
        job.cancelled = True
        if job in self._pending:
            self._pending.remove(job)
            self._drop_pending(job, None)
        elif self._runner is not None:
            self._runner.remove(job)
        log.debug("job.cancelled", uid=job.uid)

    def _drop_pending(self, job: Job, event: Event | None) -> None:
        """``job`` leaves the queue without running (cancelled, stale or aborted)."""
        with self._waiting_lock:
            self._waiting -= 1
        job.done = True
        if event is not None:
            job.send(event)

    def _forget_done(self) -> None:
        if any(j.done for j in self._jobs.values()):
            self._jobs = {k: j for k, j in self._jobs.items() if not j.done}

    def _task_step(self) -> None:
        """One batch or chunk of the oldest embedding or scoring request; a bad input or an
        MLX failure ends that request only."""
        task = self._tasks[0]
        try:
            if task.lm is not self._current:
                raise ModelUnavailable("the model changed; retry", retry_after=1)
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

    def _maybe_switch(self) -> None:
        if self._load_request is None:
            return
        settings, fut, deadline = self._load_request
        if self._runner is not None and len(self._runner) and time.monotonic() < deadline:
            return  # let in-flight generations finish within the grace period
        self._load_request = None
        if self._runner is not None:
            self._runner.fail_all(
                ModelUnavailable(
                    "the model was switched while this request ran; retry", retry_after=1
                )
            )
        self._load(settings, fut)

    def _load(self, settings: ModelSettings, fut: Future[LoadedModel] | None) -> None:
        from . import loader

        previous = self._current
        if previous is None:
            self._state = "loading"
            self._publish()
        log.info("model.loading", path=settings.path)
        try:
            lm = loader.load(settings)
            warm = warm_up(lm, self._tuning, settings.temperature, settings.top_p)
        except (ModelLoadError, MemoryError) as exc:
            self._load_failed(str(exc), exc, fut, settings, previous, log_exc=False)
            return
        except Exception as exc:  # a bug or an unexpected file: report, keep running
            msg = f"{type(exc).__name__}: {exc}"
            self._load_failed(msg, ModelLoadError(msg), fut, settings, previous, log_exc=True)
            return
        if self._runner is not None:
            self._runner.close()
        self._current = lm
        self._prompt_cache.clear()  # KV caches of another model are meaningless
        self._prompt_cache.disk = self._disk_view(lm)
        self._runner = BatchRunner(lm, self._tuning, self._prompt_cache)
        self._model_settings = settings
        self._load_error = None
        self._state = "ready"
        # Jobs tokenized for the old model cannot run on the new one.
        for job in [j for j in self._pending if j.request.model is not lm]:
            self._pending.remove(job)
            self._drop_pending(
                job, Failed(ModelUnavailable("the model changed; retry", retry_after=1))
            )
        self._publish()
        log.info("model.loaded", **lm.describe(), warmup_seconds=round(warm, 3), **self._device)
        for callback in self.on_loaded:
            callback(lm)
        self.ready_event.set()
        if fut is not None and not fut.cancelled():
            fut.set_result(lm)
        if previous is not None and previous is not lm:
            import mlx.core as mx

            del previous
            mx.clear_cache()

    def _disk_view(self, lm: LoadedModel) -> DiskView | None:
        """The disk tier for ``lm`` (its directory is indexed now), or None if it cannot be."""
        try:
            return self.disk_cache.view(model_identity(lm))
        except OSError as exc:
            log.warning("prompt_cache.disk_unavailable", error=str(exc))
            return None

    def _load_failed(
        self,
        message: str,
        exc: BaseException,
        fut: Future[LoadedModel] | None,
        settings: ModelSettings,
        previous: LoadedModel | None,
        *,
        log_exc: bool,
    ) -> None:
        self._load_error = message
        (log.exception if log_exc else log.error)(
            "model.load_failed", path=settings.path, error=message
        )
        if previous is None:
            self._state = "failed"
        self._publish()
        if fut is not None and not fut.cancelled():
            fut.set_exception(exc)

    def _renew_runner(self, error: MlxdError) -> None:
        """After a failed step: end the running jobs and start from a fresh runner."""
        if self._runner is None:
            return
        self._runner.fail_all(error)
        self._runner.close()
        self._runner = BatchRunner(self._runner.lm, self._tuning, self._prompt_cache)

    def _admit(self) -> None:
        runner = self._runner
        if runner is None or self._state != "ready" or self._load_request is not None:
            return
        while self._pending and runner.free_slots > 0:
            job = self._pending.popleft()
            if job.request.model is not self._current:
                self._drop_pending(
                    job, Failed(ModelUnavailable("the model changed; retry", retry_after=1))
                )
                continue
            with self._waiting_lock:
                self._waiting -= 1
            runner.add(job)

    def _shutdown_jobs(self) -> None:
        error = ModelUnavailable("mlxd is shutting down", retry_after=5)
        if self._runner is not None:
            self._runner.fail_all(error)
        while self._pending:
            self._drop_pending(self._pending.popleft(), Failed(error))
        while self._tasks:
            task = self._tasks.popleft()
            if not task.future.cancelled():
                task.future.set_exception(error)
        self._state = "stopped"
        self._publish()


def _dispatch(events: list[tuple[JobHandle, Event]]) -> None:
    """On the event loop: hand each event to its job's queue, in order."""
    for handle, event in events:
        handle.deliver_now(event)
