"""The engine: one dedicated thread owns MLX, the model and every MLX call.

MLX streams are thread-local, so the model is loaded and run on the same thread for its whole
life. asyncio code talks to it through two one-way channels:

* an inbox (``queue.SimpleQueue``) of commands: submit a job, load a model, stop;
* per job, an ``asyncio.Queue`` of events (``Delta``, ``Finished``, ``Failed``) fed with
  ``loop.call_soon_threadsafe``.

Generation runs through mlx-lm's ``BatchGenerator`` (continuous batching): each job keeps its
own sampler, logits processors, token budget, stop handling and cancellation. A job whose
client went away sets ``cancelled``; the thread drops it before the next decode step.

A model switch is a command on the same thread: new jobs wait, in-flight ones get
``SWITCH_GRACE_SECONDS`` to finish and are then ended with a clear 503 error, the new model is
loaded (on failure the old one keeps serving), and jobs tokenized for the old model are
answered with a 503 the OpenAI SDK retries by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ..config import EngineSettings, ModelSettings
from ..errors import GenerationFailed, MlxdError, ModelLoadError, ModelUnavailable, Overloaded
from ..logs import get_logger
from .loader import LoadedModel
from .promptcache import PromptCache
from .textfilter import TextFilter

log = get_logger("mlxd.engine")

#: How long in-flight generations may run on after a model switch was asked for.
SWITCH_GRACE_SECONDS = 5.0

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


# Events sent from the engine thread to the request ------------------------------------
@dataclass(frozen=True)
class Delta:
    content: str = ""
    reasoning: str = ""


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    stop_sequence: str | None = None  # the stop string that ended the text, if one did


@dataclass(frozen=True)
class Failed:
    error: MlxdError


Event = Delta | Finished | Failed


@dataclass(eq=False)
class Job:
    """One generation. Created on the event loop, run on the engine thread."""

    model: LoadedModel
    prompt: list[int]
    params: GenerationParams
    reasoning_mode: str
    in_think: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # engine-thread state
    uid: int = -1
    completion_tokens: int = 0
    cached_tokens: int = 0
    deadline: float = 0.0
    detokenizer: Any = None
    text: TextFilter | None = None
    done: bool = False
    _get: asyncio.Future[Event] | None = None

    def send(self, event: Event) -> None:
        # RuntimeError: the event loop is gone (shutdown); nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        """Called from the event loop when the client went away (or the request is over)."""
        self.cancelled.set()
        if self._get is not None and not self._get.done():
            self._get.cancel()

    async def next_event(self, timeout: float | None) -> Event | None:
        """The next event, or None after ``timeout`` seconds (the pending read is kept, so no
        event is lost to a timeout)."""
        if self._get is None:
            self._get = asyncio.ensure_future(self.events.get())
        done, _ = await asyncio.wait({self._get}, timeout=timeout)
        if not done:
            return None
        event = self._get.result()
        self._get = None
        return event


class Engine:
    """Owns the MLX thread. Thread-safe entry points: submit, request_load, stop, status."""

    def __init__(self, model_settings: ModelSettings, engine_settings: EngineSettings) -> None:
        self._model_settings = model_settings
        self.settings = engine_settings
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="mlxd-engine", daemon=True)
        self._pending: deque[Job] = deque()
        self._active: dict[int, Job] = {}
        self._gen: Any = None
        self._greedy: Any = None  # one shared greedy sampler, so greedy rows sample batched
        self._stops: Any = None
        self._load_request: tuple[ModelSettings, Future[LoadedModel], float] | None = None
        self._stopping = False
        self.current: LoadedModel | None = None
        self.state = "loading"  # loading | ready | failed | stopped
        self.load_error: str | None = None
        self.device: dict[str, str] = {}
        self.ready_event = threading.Event()
        self.prompt_cache = PromptCache(engine_settings.prompt_cache_bytes)
        self.on_loaded: list[Callable[[LoadedModel], None]] = []

    # -- called from any thread -----------------------------------------------------------
    def start(self) -> None:
        from mlx_lm.sample_utils import greedy_sampler

        self._greedy = greedy_sampler
        self._thread.start()

    def retune(self, engine_settings: EngineSettings) -> None:
        """Apply live-tunable engine settings (queue bound, cache budget); batch size applies
        to the next generator (next model load)."""
        self.settings = engine_settings
        self.prompt_cache.resize(engine_settings.prompt_cache_bytes)

    def require_model(self) -> LoadedModel:
        """The model to tokenize for, or a 503 that tells the client to come back."""
        lm = self.current
        if lm is None or self.state != "ready":
            if self.state == "failed":
                raise ModelUnavailable(
                    f"the model could not be loaded: {self.load_error}", retry_after=30
                )
            raise ModelUnavailable("the model is loading; retry shortly", retry_after=2)
        return lm

    def queue_depth(self) -> int:
        return len(self._pending)

    def active_count(self) -> int:
        return len(self._active)

    def submit(self, job: Job) -> None:
        if self._stopping:
            raise ModelUnavailable("mlxd is shutting down", retry_after=5)
        if len(self._pending) >= self.settings.max_queue:
            raise Overloaded(
                f"too many requests waiting ({self.settings.max_queue}); retry shortly",
                retry_after=2,
            )
        self._pending.append(job)
        self._inbox.put(("wake", None))

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

    async def collect(self, job: Job) -> AsyncIterator[Event]:
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
            self._inbox.put(("wake", None))

    # -- engine thread --------------------------------------------------------------------
    def _run(self) -> None:
        from .. import backend

        self.device = backend.device_info()
        self._load(self._model_settings, None)
        while True:
            block = not self._active and not (self._pending and self.state == "ready")
            if not self._drain_inbox(block):
                break
            try:
                self._maybe_switch()
                self._admit()
                if self._active:
                    self._step()
            except Exception as exc:  # an MLX failure must not kill the thread
                log.exception("engine.step_failed", error=str(exc))
                self._fail_active(GenerationFailed(f"generation failed: {exc}"))
                self._new_generator()
        self._shutdown_jobs()

    def _drain_inbox(self, block: bool) -> bool:
        """Handle commands; returns False when the thread must end."""
        while True:
            try:
                cmd, arg = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                return True
            block = False
            if cmd == "stop":
                return False
            if cmd == "abort":
                self._fail_active(arg)
                while self._pending:
                    self._pending.popleft().send(Failed(arg))
            if cmd == "load":
                settings, fut = arg
                if self._load_request is not None:  # a newer edit wins over an older one
                    self._load_request[1].cancel()
                self._load_request = (settings, fut, time.monotonic() + SWITCH_GRACE_SECONDS)

    def _maybe_switch(self) -> None:
        if self._load_request is None:
            return
        settings, fut, deadline = self._load_request
        if self._active and time.monotonic() < deadline:
            return  # let in-flight generations finish within the grace period
        self._load_request = None
        self._fail_active(
            ModelUnavailable("the model was switched while this request ran; retry", retry_after=1)
        )
        self._load(settings, fut)

    def _load(self, settings: ModelSettings, fut: Future[LoadedModel] | None) -> None:
        from . import loader

        previous = self.current
        if previous is None:
            self.state = "loading"
        log.info("model.loading", path=settings.path)
        try:
            lm = loader.load(settings)
            warm = self._warm_up(lm, settings)
        except (ModelLoadError, MemoryError) as exc:
            self.load_error = str(exc)
            log.error("model.load_failed", path=settings.path, error=str(exc))
            if previous is None:
                self.state = "failed"
            if fut is not None and not fut.cancelled():
                fut.set_exception(exc)
            return
        except Exception as exc:  # a bug or an unexpected file: report, keep running
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("model.load_failed", path=settings.path, error=self.load_error)
            if previous is None:
                self.state = "failed"
            if fut is not None and not fut.cancelled():
                fut.set_exception(ModelLoadError(self.load_error))
            return
        self.current = lm
        self.prompt_cache.clear()  # KV caches of another model are meaningless
        self._new_generator()
        self._model_settings = settings
        self.load_error = None
        self.state = "ready"
        # Jobs tokenized for the old model cannot run on the new one.
        stale = [j for j in self._pending if j.model is not lm]
        for job in stale:
            self._pending.remove(job)
            job.send(Failed(ModelUnavailable("the model changed; retry", retry_after=1)))
        log.info("model.loaded", **lm.describe(), warmup_seconds=round(warm, 3), **self.device)
        for callback in self.on_loaded:
            callback(lm)
        self.ready_event.set()
        if fut is not None and not fut.cancelled():
            fut.set_result(lm)
        if previous is not None and previous is not lm:
            import mlx.core as mx

            del previous
            mx.clear_cache()

    def _new_generator(self) -> None:
        from mlx_lm.generate import StopSequences

        assert self.current is not None
        self._gen = self._make_generator(self.current)
        self._stops = StopSequences([[t] for t in sorted(self.current.eos_token_ids)])
        self._active.clear()

    def _make_generator(self, lm: LoadedModel) -> Any:
        from mlx_lm.generate import BatchGenerator

        eos = [[t] for t in sorted(lm.eos_token_ids)]
        return BatchGenerator(
            lm.model,
            max_tokens=lm.context_length,
            stop_tokens=eos,
            sampler=self._greedy,
            completion_batch_size=self.settings.max_batch_size,
            prefill_batch_size=min(self.settings.max_batch_size, 8),
            prefill_step_size=self.settings.prefill_step_size,
        )

    def _warm_up(self, lm: LoadedModel, model_settings: ModelSettings) -> float:
        """Run the shapes requests will use once, so no request waits for kernel compilation.

        GPU backends compile kernels on first use (MLX's CUDA backend: seconds per kernel,
        cached on disk under ``MLX_PTX_CACHE_DIR``, see :mod:`mlxd.backend`). Covered: a
        short prefill, on a GPU a prefill longer than one ``prefill_step_size`` chunk (a full
        chunk plus a remainder), batched prefill, decode at every batch size from
        ``max_batch_size`` down to 1 (prompts finish one step apart), and the sampling paths
        (greedy, temperature with top-p, repetition penalty). Temperature and top-p are array
        inputs of the compiled sampler (see :func:`make_sampler`), so any other value reuses
        the kernel compiled here.
        """
        if not self.settings.warmup:
            return 0.0
        import mlx.core as mx
        from mlx_lm.sample_utils import make_logits_processors

        start = time.perf_counter()
        gen = self._make_generator(lm)
        vocab = int(lm.config.get("vocab_size", 1000))
        n = self.settings.max_batch_size
        rounds: list[list[list[int]]] = [[list(range(1, 9))]]
        if mx.default_device().type == mx.gpu:  # on the CPU nothing is compiled per shape
            rounds.append([list(range(1, self.settings.prefill_step_size + 38))])
        rounds.append([list(range(i + 1, i + 4 + i % 8)) for i in range(n)])
        for prompts in rounds:
            prompts = [[t % vocab for t in p] for p in prompts]
            k = len(prompts)
            samplers = [self._greedy] * k
            processors: list[list[LogitsProcessor]] = [[] for _ in range(k)]
            if k > 1:
                samplers[1] = make_sampler(model_settings.temperature, model_settings.top_p)
                processors[-1] = list(make_logits_processors(repetition_penalty=1.1))
            gen.insert(
                prompts,
                max_tokens=[i + 2 for i in range(k)],
                samplers=samplers,
                logits_processors=processors,
            )
            finished = 0
            while finished < k:
                finished += sum(r.finish_reason is not None for r in gen.next_generated())
        gen.close()
        return time.perf_counter() - start

    def _admit(self) -> None:
        if self.state != "ready" or self._load_request is not None:
            return
        while self._pending and len(self._active) < self.settings.max_batch_size:
            job = self._pending.popleft()
            if job.cancelled.is_set():
                continue
            if job.model is not self.current:
                job.send(Failed(ModelUnavailable("the model changed; retry", retry_after=1)))
                continue
            self._start(job)

    def _start(self, job: Job) -> None:
        from mlx_lm.sample_utils import make_logits_processors

        lm = job.model
        p = job.params
        if p.temperature == 0:
            sampler = self._greedy
        else:
            sampler = make_sampler(p.temperature, p.top_p, p.seed, p.top_k)
        processors = list(p.logits_processors)
        if p.repetition_penalty and p.repetition_penalty != 1.0:
            processors += make_logits_processors(repetition_penalty=p.repetition_penalty)
        job.detokenizer = lm.tokenizer.detokenizer
        job.text = TextFilter(
            stop=list(p.stop), reasoning=job.reasoning_mode, in_think=job.in_think
        )
        job.deadline = time.monotonic() + p.timeout
        cache, n_cached = self.prompt_cache.lookup(job.prompt)
        job.cached_tokens = n_cached
        (job.uid,) = self._gen.insert(
            [job.prompt[n_cached:]],
            max_tokens=[p.max_tokens],
            caches=[cache] if cache is not None else None,
            all_tokens=[job.prompt[:n_cached]],
            samplers=[sampler],
            logits_processors=[processors],
            stop_sequences=[self._stops],
        )
        self._active[job.uid] = job

    def _step(self) -> None:
        now = time.monotonic()
        gone = [j for j in self._active.values() if j.cancelled.is_set()]
        late = [j for j in self._active.values() if now > j.deadline and j not in gone]
        if gone:
            self._gen.remove([j.uid for j in gone])
            for job in gone:
                del self._active[job.uid]
                log.debug("job.cancelled", uid=job.uid)
        for job in late:
            self._gen.remove([job.uid])
            self._finish(job, "length")
        if not self._active:
            return
        _, responses = self._gen.next()
        for r in responses:
            found = self._active.get(r.uid)
            if found is None:
                continue
            job = found
            if r.finish_reason is not None and r.prompt_cache is not None:
                self.prompt_cache.store(r.all_tokens, r.prompt_cache)
            if r.finish_reason == "stop":  # an end-of-turn token: not part of the text
                self._finish(job, "stop")
                continue
            job.completion_tokens += 1
            job.detokenizer.add_token(r.token)
            self._emit(job, job.detokenizer.last_segment)
            if job.done:
                continue
            if r.finish_reason == "length":
                self._finish(job, "length")

    def _emit(self, job: Job, text: str) -> None:
        assert job.text is not None
        piece = job.text.feed(text) if text else None
        if piece is not None and (piece.content or piece.reasoning):
            job.send(Delta(piece.content, piece.reasoning))
        if piece is not None and piece.stopped:
            kept = self._gen.remove([job.uid], return_prompt_caches=True)
            if job.uid in kept:
                cache, tokens = kept[job.uid]
                self.prompt_cache.store(tokens, cache)
            self._finish(job, "stop", flush=False)

    def _finish(self, job: Job, reason: str, *, flush: bool = True) -> None:
        if job.done:
            return
        if flush:
            assert job.text is not None
            job.detokenizer.finalize()
            tail = job.detokenizer.last_segment
            piece = job.text.feed(tail) if tail else None
            rest = job.text.finish()
            content = (piece.content if piece else "") + rest.content
            reasoning = (piece.reasoning if piece else "") + rest.reasoning
            if piece is not None and piece.stopped:
                reason = "stop"
            if content or reasoning:
                job.send(Delta(content, reasoning))
        job.done = True
        self._active.pop(job.uid, None)
        job.send(
            Finished(
                finish_reason=reason,
                prompt_tokens=len(job.prompt),
                completion_tokens=job.completion_tokens,
                cached_tokens=job.cached_tokens,
                stop_sequence=job.text.matched if job.text is not None else None,
            )
        )

    def _fail_active(self, error: MlxdError) -> None:
        if self._gen is not None and self._active:
            try:
                self._gen.remove(list(self._active))
            except Exception:  # the generator may be broken; it is replaced anyway
                log.debug("engine.remove_failed")
        for job in list(self._active.values()):
            job.done = True
            job.send(Failed(error))
        self._active.clear()

    def _shutdown_jobs(self) -> None:
        error = ModelUnavailable("mlxd is shutting down", retry_after=5)
        self._fail_active(error)
        while self._pending:
            self._pending.popleft().send(Failed(error))
        self.state = "stopped"


def make_sampler(
    temperature: float, top_p: float, seed: int | None = None, top_k: int = 0
) -> Callable[[Any], Any]:
    """A temperature/top-p sampler whose parameters are MLX arrays, not Python floats.

    mlx-lm's sampling functions are ``mx.compile``d; a float argument is baked into the
    compiled kernel, so every new temperature would compile again (about 2 s on CUDA). As
    arrays, one compiled kernel serves every value. With a seed the sampler keeps its own PRNG
    key, so the seed reproduces a request even inside a batch. ``top_k`` (0: off; a value
    at or above the vocabulary size is off too) is an integer of the compiled function, so
    each distinct value compiles once.
    """
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_top_k, apply_top_p, categorical_sampling

    temp = mx.array(temperature, dtype=mx.float32)
    nucleus = mx.array(top_p, dtype=mx.float32)
    use_top_p = 0 < top_p < 1
    state = {"key": mx.random.key(seed)} if seed is not None else None

    def sample(logprobs: Any) -> Any:
        if 0 < top_k < logprobs.shape[-1]:
            logprobs = apply_top_k(logprobs, top_k)
        if use_top_p:
            logprobs = apply_top_p(logprobs, nucleus)
        if state is None:
            return categorical_sampling(logprobs, temp)
        state["key"], sub = mx.random.split(state["key"])
        return mx.random.categorical(logprobs * (1 / temp), key=sub)

    return sample
