"""One model's running generations: admit, step, emit, finish, on the engine thread only.

A :class:`BatchRunner` holds the sequences of one loaded model and advances them together
through mlx-lm's ``BatchGenerator`` (continuous batching): each job keeps its own sampler,
logits processors, token budget, stop handling and cancellation, and its prompt reuses the
longest cached prefix from the :class:`~mlxd.engine.promptcache.PromptCache`. The engine
(:mod:`mlxd.engine.core`) owns the thread, the inbox and the queue, and calls the runner.

A failure inside one sequence ends only that sequence: its sampler and logits processors are
wrapped so that an exception marks the job and lets the step go on (the job is then answered
with ``Failed``), and a grammar whose matcher failed ends its job as ``Failed`` too, never as
an ordinary stop.

One piece: admission, the solo/batch handoff, stepping and finishing share one job state
machine whose invariants (the cache holds exactly the tokens; one pending token) are kept in
one file.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, cast

from ..config import EngineSettings
from ..errors import BadRequest, GenerationFailed, MlxdError
from ..logs import get_logger
from .distributed import Group, agreeing
from .loader import LoadedModel
from .promptcache import PromptCache
from .protocol import (
    Delta,
    Event,
    Failed,
    Finished,
    GenerationRequest,
    LogitsProcessor,
    TokenLogprob,
)
from .solo import SoloSequence
from .textfilter import TextFilter

log = get_logger("mlxd.engine")

#: Seeds MLX's PRNG accepts (a uint64); anything else is refused before it reaches a batch.
SEED_LIMIT = 2**64

#: A batch step prefills at most this many chunks' worth of prompt tokens (``rows x the
#: longest row's chunk``, since the generator pads its prompt batch): the most mlx-lm's
#: default admission (8 prompts, one chunk each) ever prefilled in one step. Within it, as
#: many waiting prompts are admitted as fit: a burst of short prompts starts in one step.
PREFILL_CHUNKS_PER_STEP = 8


@dataclass(eq=False)
class Job:
    """Engine-thread state of one generation (the API holds its :class:`JobHandle`)."""

    id: int
    request: GenerationRequest
    send: Callable[[Event], None]
    cancelled: bool = False
    uid: int = -1
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    deadline: float = 0.0
    detokenizer: Any = None
    text: TextFilter | None = None
    done: bool = False
    #: First failure inside this sequence's sampler or processors (or its grammar's matcher).
    error: str | None = None
    grammars: list[Any] = field(default_factory=list)
    sampler: Any = None
    processors: list[LogitsProcessor] = field(default_factory=list)
    #: Logprobs of tokens whose text has not been sent yet (requests that asked for them).
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def sequence_error(self) -> str | None:
        if self.error is not None:
            return self.error
        for grammar in self.grammars:
            if grammar.error is not None:
                return f"constrained generation failed: {grammar.error}"
        return None


class BatchRunner:
    """The generations of one model. Every method runs on the engine thread.

    A sequence that is alone runs as a :class:`~mlxd.engine.solo.SoloSequence` (the fast
    path); a second request moves it into the ``BatchGenerator`` (its cache, tokens and
    sampler state go along, so no token changes), and when the batch is down to one sequence
    in decode that one leaves it again.
    """

    def __init__(
        self,
        lm: LoadedModel,
        settings: EngineSettings,
        prompt_cache: PromptCache,
        group: Group | None = None,
    ):
        from mlx_lm.sample_utils import greedy_sampler

        self.lm = lm
        self.settings = settings
        #: Most sequences decoded together.
        self.slots = batch_size(settings)
        self.prompt_cache = prompt_cache
        #: Serving across a process group (:mod:`.distributed`): rank 0 broadcasts each
        #: operation before it runs it; the followers' runners get them from there.
        self.group = group
        self.lead = group is not None and group.rank == 0
        # One shared sampler, so greedy rows sample batched.
        self._greedy: Any = greedy_sampler
        if group is not None:
            self._greedy = agreeing(greedy_sampler if self.lead else None, group)
        self._eos = frozenset(lm.eos_token_ids)
        self._gen = make_generator(lm, settings, greedy_sampler, same_stream=group is not None)
        self.active: dict[int, Job] = {}  # by job id
        self._by_uid: dict[int, Job] = {}  # the ones inside the BatchGenerator
        self._solo: tuple[Job, SoloSequence] | None = None
        #: KV caches of sequences that ended this step, stored by :meth:`store_kept` once
        #: their events are out (the copy is not on the way to the client's last text).
        self._kept: list[tuple[list[int], list[Any]]] = []

    def __len__(self) -> int:
        return len(self.active)

    @property
    def free_slots(self) -> int:
        return self.slots - len(self.active)

    @property
    def solo(self) -> bool:
        """True while one sequence runs on the fast path."""
        return self._solo is not None

    def close(self) -> None:
        self._gen.close()

    @property
    def has_kept(self) -> bool:
        return bool(self._kept)

    def store_kept(self) -> None:
        """Put the caches of the sequences that ended into the prompt cache (RAM copy, disk
        tier hand-off). The engine calls it after delivering the step's text; :meth:`add`
        and :meth:`step` call it first, so a lookup always sees every earlier sequence (on
        every rank of a group alike)."""
        kept, self._kept = self._kept, []
        for tokens, cache in kept:
            self.prompt_cache.store(tokens, cache)

    # -- admission ------------------------------------------------------------------------
    def add(self, job: Job, now: float | None = None) -> None:
        """Start ``job``; a job whose settings cannot run (a bad seed) fails alone."""
        from mlx_lm.models.cache import make_prompt_cache

        self.store_kept()
        try:
            job.sampler, job.processors = self._sampling(job)
        except MlxdError as exc:
            job.done = True
            job.send(Failed(exc))
            return
        now = time.monotonic() if now is None else now
        p = job.request.params
        if self.lead:
            assert self.group is not None
            r = job.request
            shared = replace(p, logits_processors=())  # rank 0 alone runs processors
            self.group.send(("add", job.id, r.prompt, shared, r.reasoning_mode, r.in_think, now))
        job.detokenizer = self.lm.tokenizer.detokenizer
        if p.raw_text:
            keep_leading_space(job.detokenizer)
        job.text = TextFilter(
            stop=list(p.stop), reasoning=job.request.reasoning_mode, in_think=job.request.in_think
        )
        job.deadline = now + p.timeout
        prompt = job.request.prompt
        cache, n_cached = self.prompt_cache.lookup(prompt)
        job.cached_tokens = n_cached
        # The fast path samples without keeping logprobs: a request for them runs in the
        # batch, whose generator returns every token's.
        if not self.active and p.logprobs is None:
            if cache is None:
                cache = make_prompt_cache(self.lm.model)
            solo = SoloSequence(
                self.lm.model,
                cache,
                prompt[:n_cached],
                prompt[n_cached:],
                job.sampler,
                job.processors,
                self.settings.prefill_step_size,
            )
            self.active[job.id] = job
            self._solo = (job, solo)
            return
        self._join_solo()
        self.active[job.id] = job
        self._insert(job, prompt[n_cached:], cache, prompt[:n_cached])

    def _insert(self, job: Job, remaining: list[int], cache: Any, tokens: list[int]) -> None:
        (job.uid,) = self._gen.insert(
            [remaining],
            max_tokens=[job.request.params.max_tokens - job.completion_tokens],
            caches=[cache] if cache is not None else None,
            all_tokens=[tokens],
            samplers=[job.sampler],
            logits_processors=[job.processors],
        )
        self._by_uid[job.uid] = job

    def _join_solo(self) -> None:
        """Move the fast-path sequence into the batch (a second request arrived)."""
        if self._solo is None:
            return
        job, solo = self._solo
        self._solo = None
        prefilling = solo.prefilling
        cache, tokens, remaining = solo.handoff()
        if not prefilling:
            # The pending token was sampled on the fast path: show it now; the batch
            # feeds it as its last "prompt" token and samples the next one.
            self._take(job, remaining[0], solo)
            if job.done:
                return
        self._insert(job, remaining, cache, tokens)

    def _leave_batch(self) -> None:
        """Move the batch's last sequence to the fast path."""
        if self._solo is not None or len(self.active) != 1:
            return
        if next(iter(self.active.values())).request.params.logprobs is not None:
            return  # logprobs come from the batch (see add)
        sole = _sole_generation(self._gen)
        if sole is None:
            return
        uid, cache, tokens, pending = sole
        job = self._by_uid.pop(uid)
        self._gen.remove([uid])
        job.uid = -1
        solo = SoloSequence.from_batch(
            self.lm.model,
            cache,
            tokens,
            pending,
            job.sampler,
            job.processors,
            self.settings.prefill_step_size,
        )
        self._solo = (job, solo)

    def _sampling(self, job: Job) -> tuple[Any, list[LogitsProcessor]]:
        from mlx_lm.sample_utils import make_logits_processors

        p = job.request.params
        if p.seed is not None and not 0 <= p.seed < SEED_LIMIT:
            raise BadRequest(f"seed must be between 0 and {SEED_LIMIT - 1}", param="seed")
        sampler: Any = self._greedy
        if p.temperature != 0:
            sampler = _guarded_sampler(job, make_sampler(p.temperature, p.top_p, p.seed, p.top_k))
            if self.group is not None:
                sampler = agreeing(sampler if self.lead else None, self.group)
        processors = list(p.logits_processors)
        if p.repetition_penalty and p.repetition_penalty != 1.0:
            processors += make_logits_processors(repetition_penalty=p.repetition_penalty)
        # Processors that can fail without raising (GrammarProcessor) report it in ``error``.
        job.grammars = [q for q in processors if hasattr(q, "error")]
        return sampler, [_guarded_processor(job, q) for q in processors]

    # -- stepping -------------------------------------------------------------------------
    def remove(self, job: Job) -> None:
        """Drop a cancelled job (its client is gone: nothing is sent)."""
        if self.active.pop(job.id, None) is not None:
            if self.lead:
                assert self.group is not None
                self.group.send(("remove", job.id))
            self._detach(job, keep_cache=False)
            job.done = True

    def _detach(self, job: Job, *, keep_cache: bool) -> None:
        """Take ``job`` out of the fast path or the batch, keeping its KV cache if asked."""
        if self._solo is not None and self._solo[0] is job:
            solo = self._solo[1]
            self._solo = None
            if keep_cache:
                self._kept.append((solo.tokens, solo.cache))
        elif self._by_uid.pop(job.uid, None) is not None:
            kept = self._gen.remove([job.uid], return_prompt_caches=keep_cache)
            if job.uid in kept:
                self._kept.append((kept[job.uid][1], kept[job.uid][0]))

    def step(self, now: float | None = None, failed: list[int] | None = None) -> None:
        """One step: on the fast path a prefill chunk or a token; in the batch one decode step
        for every sequence (and one prefill chunk for waiting prompts).

        In a group the followers get rank 0's clock (``now``) and the jobs whose sampler or
        grammar failed there (``failed``: rank 0 alone runs them), and apply both at the
        start of the step, as rank 0 does."""
        self.store_kept()
        now = time.monotonic() if now is None else now
        if self.group is not None:
            if self.lead:
                failed = [j.id for j in self.active.values() if j.sequence_error() is not None]
                self.group.send(("step", now, failed))
            for job_id in failed or ():
                found = self.active.get(job_id)
                if found is not None:
                    found.error = found.error or "failed on rank 0"
                    self._finish(found, "stop")
        for job in [j for j in self.active.values() if now > j.deadline]:
            self._finish(job, "length")
        if self._solo is not None:
            self._step_solo(*self._solo)
        elif self._by_uid:
            self._step_batch()
        if self.group is None:
            for job in [j for j in self.active.values() if j.sequence_error() is not None]:
                self._finish(job, "stop")
        self._leave_batch()

    def _step_solo(self, job: Job, solo: SoloSequence) -> None:
        if solo.prefilling:
            solo.prefill_chunk()
            return
        more = job.completion_tokens + 1 < job.request.params.max_tokens
        self._take(job, solo.decode(more), solo)

    def _take(self, job: Job, token: int, solo: SoloSequence | None) -> None:
        """A fast-path token: end of turn, or text, then the token budget."""
        if token in self._eos:  # an end-of-turn token: not part of the text
            self._finish(job, "stop")
            return
        self._text(job, token)
        if not job.done and job.completion_tokens >= job.request.params.max_tokens:
            self._finish(job, "length")

    def _step_batch(self) -> None:
        self._gen.prefill_batch_size = prompt_rows(self._gen, self.settings.prefill_step_size)
        _, responses = self._gen.next()
        for r in responses:
            found = self._by_uid.get(r.uid)
            if found is None:
                continue
            job = found
            if r.finish_reason is not None:
                self._by_uid.pop(r.uid, None)  # the generator has let it go
                if r.prompt_cache is not None:
                    self._kept.append((r.all_tokens, r.prompt_cache))
            if r.finish_reason == "stop":  # an end-of-turn token: not part of the text
                self._finish(job, "stop")
                continue
            self._text(job, r.token, r.logprobs)
            if not job.done and r.finish_reason == "length":
                self._finish(job, "length")

    def _text(self, job: Job, token: int, logprobs: Any = None) -> None:
        assert job.text is not None
        job.completion_tokens += 1
        k = job.request.params.logprobs
        if k is not None and logprobs is not None:
            job.logprobs.append(token_logprob(logprobs, token, k))
        job.detokenizer.add_token(token)
        segment = job.detokenizer.last_segment
        thinking = job.text.in_think
        piece = job.text.feed(segment) if segment else None
        if thinking or job.text.in_think:
            job.reasoning_tokens += 1
        if piece is not None and (piece.content or piece.reasoning):
            job.send(Delta(piece.content, piece.reasoning, _take_logprobs(job)))
        if piece is not None and piece.stopped:
            self._finish(job, "stop", flush=False)

    def _finish(self, job: Job, reason: str, *, flush: bool = True) -> None:
        if job.done:
            return
        job.done = True
        self.active.pop(job.id, None)
        self._detach(job, keep_cache=True)
        error = job.sequence_error()
        if error is not None:
            log.warning("job.failed", job=job.id, error=error)
            job.send(Failed(GenerationFailed(error)))
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
            if content or reasoning or job.logprobs:
                job.send(Delta(content, reasoning, _take_logprobs(job)))
        job.send(
            Finished(
                finish_reason=reason,
                prompt_tokens=len(job.request.prompt),
                completion_tokens=job.completion_tokens,
                cached_tokens=job.cached_tokens,
                reasoning_tokens=job.reasoning_tokens,
                stop_sequence=job.text.matched if job.text is not None else None,
            )
        )

    def fail_all(self, error: MlxdError) -> None:
        """End every running job with ``error`` (model switch, shutdown, a broken step)."""
        if self.lead and self.active:
            assert self.group is not None
            if not self.group.broken:
                self.group.send(("fail_all",))
        self.fail_all_local(error)

    def fail_all_local(self, error: MlxdError | None = None) -> None:
        """:meth:`fail_all` on this rank only (a follower; a broken group)."""
        if self._by_uid:
            try:
                self._gen.remove(list(self._by_uid))
            except Exception:  # the generator may be broken; it is replaced anyway
                log.debug("engine.remove_failed")
        self._by_uid.clear()
        self._solo = None
        for job in list(self.active.values()):
            job.done = True
            if error is not None:
                job.send(Failed(error))
        self.active.clear()


def _sole_generation(gen: Any) -> tuple[int, list[Any], list[int], Any] | None:
    """The one sequence of ``gen`` if it holds exactly one and it is decoding: its uid, its
    cache (extracted from the batch), the tokens the cache holds and the token already
    sampled for it. None otherwise.

    This reads ``BatchGenerator``'s stage containers (mlx-lm 0.32): the public API has no
    way to take a sequence out together with its sampled-ahead token. If the layout differs
    (another mlx-lm), the answer is None and the sequence simply stays in the batch.
    """
    try:
        batch = gen._generation_batch
        if len(batch) != 1 or gen._unprocessed_sequences or len(gen._prompt_batch):
            return None
        pending = batch._next_tokens
        if pending is None or pending.shape != (1,):
            return None
        return batch.uids[0], batch.extract_cache(0), list(batch.tokens[0]), pending
    except (AttributeError, TypeError, IndexError):
        return None


def prompt_rows(gen: Any, chunk: int) -> int:
    """The ``prefill_batch_size`` for ``gen``'s next step: its prompt batch as it stands plus
    the waiting prompts that fit in :data:`PREFILL_CHUNKS_PER_STEP` chunks of ``chunk`` tokens.

    mlx-lm admits at most ``prefill_batch_size - len(prompt batch)`` waiting prompts per step,
    counted before the prompts that finished prefilling leave the prompt batch; this counts
    only the rows that stay, so a burst is admitted in the step where the previous group moves
    on. Prompts are taken in arrival order; at least one is admitted into an empty prompt batch.
    It reads ``BatchGenerator``'s stage containers (mlx-lm 0.32, as :func:`_sole_generation`);
    with another layout it answers mlx-lm's own default (8).
    """
    budget = PREFILL_CHUNKS_PER_STEP * chunk

    def prefills(segments: list[list[int]]) -> int:
        """Tokens a sequence prefills in the step; 0 when only its last prompt token is left
        (it moves on to generation: a finished prefill, or a sequence joining from the fast
        path), the test mlx-lm's ``_next`` makes."""
        return 0 if len(segments) == 1 and len(segments[0]) == 1 else min(len(segments[0]), chunk)

    try:
        staying = [w for w in (prefills(seq[0]) for seq in gen._currently_processing) if w]
        rows, longest = len(staying), max(staying, default=0)
        admit = 0
        for waiting in gen._unprocessed_sequences:
            width = max(longest, prefills(waiting[1]))
            if rows + admit and (rows + admit + 1) * width > budget:
                break
            admit, longest = admit + 1, width
        return max(len(gen._prompt_batch) + admit, 1)
    except (AttributeError, TypeError, IndexError, ValueError):
        return PREFILL_CHUNKS_PER_STEP


def _guarded_processor(job: Job, processor: LogitsProcessor) -> LogitsProcessor:
    """``processor``, except that an exception marks ``job`` failed instead of aborting the
    whole batch step; the job's logits then pass unchanged until it is removed."""

    def run(tokens: Any, logits: Any) -> Any:
        if job.error is not None:
            return logits
        try:
            return processor(tokens, logits)
        except Exception as exc:
            job.error = f"logits processor failed: {type(exc).__name__}: {exc}"
            return logits

    return run


def _guarded_sampler(job: Job, sampler: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``sampler`` with the same containment as :func:`_guarded_processor` (greedy fallback)."""
    import mlx.core as mx

    def run(logprobs: Any) -> Any:
        if job.error is None:
            try:
                return sampler(logprobs)
            except Exception as exc:
                job.error = f"sampler failed: {type(exc).__name__}: {exc}"
        return mx.argmax(logprobs, axis=-1)

    return run


def token_logprob(logprobs: Any, token: int, k: int) -> TokenLogprob:
    """``token``'s entry from one step's log-probabilities (an evaluated MLX vector): its own
    value and the ``k`` largest, most likely first. Tokens a grammar masked out (-inf) are
    left out of the alternatives."""
    import mlx.core as mx

    chosen = float(logprobs[token].item())
    top: tuple[tuple[int, float], ...] = ()
    if k:
        ids = mx.argpartition(-logprobs, kth=k - 1)[:k]
        values = logprobs[ids].astype(mx.float32)
        pairs = zip(cast(list[int], ids.tolist()), cast(list[float], values.tolist()), strict=True)
        top = tuple(sorted(((i, v) for i, v in pairs if math.isfinite(v)), key=lambda t: -t[1]))
    return TokenLogprob(token, chosen if math.isfinite(chosen) else -9999.0, top)


def _take_logprobs(job: Job) -> tuple[TokenLogprob, ...]:
    taken = tuple(job.logprobs)
    job.logprobs.clear()
    return taken


def keep_leading_space(detokenizer: Any) -> None:
    """Make an mlx-lm streaming detokenizer keep the first token's leading space (BPE and
    SentencePiece detokenizers drop it by default: right for a chat answer, wrong for text
    that continues a prompt)."""
    if hasattr(detokenizer, "trim_space"):
        detokenizer.trim_space = False
    if hasattr(detokenizer, "_maybe_trim_space"):
        detokenizer._maybe_trim_space = lambda text: text


def batch_size(settings: EngineSettings) -> int:
    """``settings.max_batch_size`` as a number. The engine resolves ``auto`` per model before
    it builds a runner (:func:`mlxd.models.memory.plan`); settings that still say ``auto``
    (a model not sized yet, profiles, tests) get the old fixed default."""
    from ..models.memory import UNKNOWN_SLOTS

    fixed = settings.max_batch_size
    return fixed if isinstance(fixed, int) else UNKNOWN_SLOTS


def make_generator(
    lm: LoadedModel, settings: EngineSettings, sampler: Any, *, same_stream: bool = False
) -> Any:
    """mlx-lm's ``BatchGenerator`` for ``lm``. With ``same_stream`` it runs on this thread's
    default stream instead of mlx-lm's own generation stream: in a process group every
    collective of a rank must run in one order on one stream (the fast path and the op
    broadcast run on the default stream; on a second stream, the batch's asynchronous next
    step and the broadcast's ``all_sum`` were paired with different collectives on the other
    ranks, measured: an ``UnpicklingError`` on the follower)."""
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator

    eos = [[t] for t in sorted(lm.eos_token_ids)]
    slots = batch_size(settings)
    return BatchGenerator(
        lm.model,
        max_tokens=lm.context_length,
        stop_tokens=eos,
        sampler=sampler,
        completion_batch_size=slots,
        prefill_batch_size=min(slots, PREFILL_CHUNKS_PER_STEP),
        prefill_step_size=settings.prefill_step_size,
        stream=mx.default_stream(mx.default_device()) if same_stream else None,
    )


def warm_up(lm: LoadedModel, settings: EngineSettings, temperature: float, top_p: float) -> float:
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
    if not settings.warmup:
        return 0.0
    import mlx.core as mx
    from mlx_lm.sample_utils import greedy_sampler, make_logits_processors

    start = time.perf_counter()
    gen = make_generator(lm, settings, greedy_sampler)
    vocab = int(lm.config.get("vocab_size", 1000))
    n = batch_size(settings)
    rounds: list[list[list[int]]] = [[list(range(1, 9))]]
    if mx.default_device().type == mx.gpu:  # on the CPU nothing is compiled per shape
        rounds.append([list(range(1, settings.prefill_step_size + 38))])
    rounds.append([list(range(i + 1, i + 4 + i % 8)) for i in range(n)])
    for prompts in rounds:
        prompts = [[t % vocab for t in p] for p in prompts]
        k = len(prompts)
        samplers: list[Any] = [greedy_sampler] * k
        processors: list[list[LogitsProcessor]] = [[] for _ in range(k)]
        if k > 1:
            samplers[1] = make_sampler(temperature, top_p)
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
