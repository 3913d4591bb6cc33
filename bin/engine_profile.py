"""Where the engine's time goes, in one process, against mlx-lm's own loop (docs/engine.md).

    .venv/bin/python bin/engine_profile.py [--model PATH] [--tokens N] [--prompt N]
        [--contexts 256 2048 6144] [--chunks 256 512 2048] [--out result.json]

Runs on the CPU here and on the GPU machine (``bin/gpu-bench``), the same way:

* ``decode``: tokens per second of one sequence: ``mlx_lm.stream_generate``; mlx-lm's
  ``BatchGenerator`` holding one sequence (what mlxd ran before its fast path); mlxd's
  ``BatchRunner`` (fast path, no event loop); and the whole ``Engine`` driven from asyncio
  (submit, events through the event loop). Also the prefill time of the ``--prompt`` tokens
  on each path.
* ``breakdown``: one decoding step split into its parts, each forced to finish
  (``mx.eval``) before the next so it can be timed alone: model forward, log-softmax and
  sampling, the ``.item()`` host copy, detokenizing, the text filter, and the hop of one
  event onto the asyncio loop. The sum is larger than an unsynchronized step (which overlaps
  the device with the host); the shares are what matters.
* ``batch``: aggregate decode tokens per second of N sequences decoding together (every N in
  ``--streams``), steady state (all N past their prompts, none finished), on five paths: a
  bare loop (forward, greedy argmax, one step in flight, one host copy per step: the floor
  for N rows), mlx-lm's ``BatchGenerator``, the same with a lean step (no log-softmax, no
  per-row split of the logprobs), mlxd's ``BatchRunner`` (no event loop; with the share of
  its step spent inside the generator) and the whole ``Engine`` from asyncio (events through
  the loop, no HTTP). End-of-turn tokens are
  taken out of the model's stop set, so no sequence ends early.
* ``ramp``: a burst of N prompts (40-100 tokens each) reaching ``BatchRunner`` together:
  milliseconds and batch steps until every one of them has its first token, with mlxd's
  admission (as many waiting prompts per step as fit in eight chunks of prompt tokens) and
  with mlx-lm's (8 prompts per step, none in the step where the previous 8 move on).
* ``shapes``: what a prompt chunk of a shape not run before costs (on a GPU backend, setup
  per new shape): a chunk of L tokens after a cached prefix of O tokens on a plain
  ``KVCache``, timed the first time that (O, L) runs and again right after, for new lengths
  at a fixed offset, new offsets at a fixed length, and L rounded up to a multiple of 32.
* ``static``: one sequence, greedy, on a fixed-size KV buffer (every step the same shapes,
  the cache offset an array, attention masked to the filled part), with the step run as is
  and traced by ``mx.compile``, in turn with ``stream_generate``: tokens per second, the
  host time to build one step's graph, and whether the tokens are ``stream_generate``'s.
* ``prefill``: prompt tokens per second of one chunk of C tokens appended to a cache that
  already holds L tokens, with a plain ``KVCache`` (causal mask by name) and with the batch
  cache (``BatchKVCache``, explicit mask array), for every L in ``--contexts`` and C in
  ``--chunks``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "daemon"))


def _load(model: str | None) -> Any:
    from mlxd.config import ModelSettings
    from mlxd.engine import loader

    settings = ModelSettings() if model is None else ModelSettings(path=model)
    return loader.load(settings), settings


def _prompt(lm: Any, n: int, seed: int = 0) -> list[int]:
    """``n`` token ids that are not end-of-turn tokens (a deterministic spread)."""
    vocab = int(lm.config.get("vocab_size", 32000))
    eos = set(lm.eos_token_ids)
    out: list[int] = []
    i = seed
    while len(out) < n:
        t = (i * 7919 + 13) % (vocab - 10) + 5
        if t not in eos:
            out.append(t)
        i += 1
    return out


NO_EOS = False  # --no-eos


def _no_eos(lm: Any) -> Any:
    """With ``--no-eos``, a logits processor that forbids end-of-turn tokens, so every path
    decodes N tokens with a real model (the GPU bench's random model never ends early)."""
    import mlx.core as mx

    if not NO_EOS:
        return None

    eos = sorted(lm.eos_token_ids)

    def block(tokens: Any, logits: Any) -> Any:
        mask = mx.zeros((logits.shape[-1],), dtype=mx.bool_)
        mask[mx.array(eos)] = True
        return mx.where(mask, mx.array(-1e9, logits.dtype), logits)

    return block


def _processors(lm: Any) -> list[Any]:
    return [p for p in [_no_eos(lm)] if p is not None]


def decode_stream_generate(lm: Any, prompt: list[int], n: int) -> dict[str, float]:
    from mlx_lm import stream_generate

    last = None
    processors = [p for p in [_no_eos(lm)] if p is not None]
    for r in stream_generate(
        lm.model, lm.tokenizer, prompt, max_tokens=n, logits_processors=processors
    ):
        last = r
    assert last is not None
    return {"decode_tps": last.generation_tps, "prefill_tps": last.prompt_tps}


def decode_batch_generator(lm: Any, prompt: list[int], n: int, step: int) -> dict[str, float]:
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(lm.model, max_tokens=n, prefill_step_size=step)
    start = time.perf_counter()
    gen.insert([prompt], max_tokens=[n], logits_processors=[_processors(lm)])
    first = None
    count = 0
    while True:
        rs = gen.next_generated()
        if first is None:
            first = time.perf_counter()
        count += len(rs)
        if any(r.finish_reason is not None for r in rs):
            break
    end = time.perf_counter()
    gen.close()
    return {"decode_tps": (count - 1) / (end - first), "prefill_tps": len(prompt) / (first - start)}


class _Sink:
    def __init__(self) -> None:
        self.events: list[Any] = []
        self.times: list[float] = []

    def __call__(self, event: Any) -> None:
        self.times.append(time.perf_counter())
        self.events.append(event)


def decode_runner(lm: Any, prompt: list[int], n: int, step: int) -> dict[str, float]:
    from mlxd.config import EngineSettings
    from mlxd.engine.batch import BatchRunner, Job
    from mlxd.engine.promptcache import PromptCache
    from mlxd.engine.protocol import GenerationParams, GenerationRequest

    settings = EngineSettings(prefill_step_size=step, warmup=False)
    runner = BatchRunner(lm, settings, PromptCache(0))
    params = GenerationParams(
        max_tokens=n, temperature=0.0, top_p=1.0, logits_processors=tuple(_processors(lm))
    )
    sink = _Sink()
    job = Job(1, GenerationRequest(model=lm, prompt=prompt, params=params), sink)
    start = time.perf_counter()
    runner.add(job)
    steps = 0
    first = None
    while not job.done:
        runner.step()
        steps += 1
        if first is None and not runner._solo[1].prefilling:  # type: ignore[index]
            first = time.perf_counter()
    end = time.perf_counter()
    assert first is not None
    return {"decode_tps": (n - 1) / (end - first), "prefill_tps": len(prompt) / (first - start)}


def decode_engine(model: str | None, prompt: list[int], n: int, step: int) -> dict[str, float]:
    from mlxd.config import EngineSettings, ModelSettings
    from mlxd.engine.core import Delta, Engine, Finished, GenerationParams, GenerationRequest

    settings = ModelSettings() if model is None else ModelSettings(path=model)
    engine = Engine(settings, EngineSettings(prefill_step_size=step, warmup=False))
    engine.start()
    assert engine.ready_event.wait(600), engine.load_error
    lm = engine.require_model()

    async def main() -> dict[str, float]:
        params = GenerationParams(
            max_tokens=n, temperature=0.0, top_p=1.0, logits_processors=tuple(_processors(lm))
        )
        start = time.perf_counter()
        job = engine.submit(GenerationRequest(model=lm, prompt=prompt, params=params))
        first = None
        fin = None
        async for ev in engine.collect(job):
            if isinstance(ev, Delta) and first is None:
                first = time.perf_counter()
            if isinstance(ev, Finished):
                fin = ev
        end = time.perf_counter()
        assert fin is not None and first is not None
        return {
            "decode_tps": (fin.completion_tokens - 1) / (end - first),
            "prefill_tps": len(prompt) / (first - start),
        }

    try:
        return asyncio.run(main())
    finally:
        engine.stop()


def breakdown(lm: Any, prompt: list[int], n: int) -> dict[str, float]:
    """Milliseconds per token of each part of a step, each part synchronized."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.sample_utils import greedy_sampler

    from mlxd.engine.textfilter import TextFilter

    cache = make_prompt_cache(lm.model)
    lm.model(mx.array(prompt[:-1])[None], cache=cache)
    mx.eval([c.state for c in cache])
    detok = lm.tokenizer.detokenizer
    text = TextFilter(stop=[], reasoning="separate")
    parts: dict[str, list[float]] = {
        k: [] for k in ("forward", "sample", "item", "detok", "filter")
    }
    y = mx.array(prompt[-1:])
    block = _no_eos(lm) or (lambda _, logits: logits)
    for _ in range(n):
        t0 = time.perf_counter()
        logits = lm.model(y[None], cache=cache)[:, -1, :]
        mx.eval(logits)
        t1 = time.perf_counter()
        logits = block(None, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        y = greedy_sampler(logprobs)
        mx.eval(y)
        t2 = time.perf_counter()
        tok = int(y.item())
        t3 = time.perf_counter()
        detok.add_token(tok)
        seg = detok.last_segment
        t4 = time.perf_counter()
        text.feed(seg)
        t5 = time.perf_counter()
        for key, a, b in (
            ("forward", t0, t1),
            ("sample", t1, t2),
            ("item", t2, t3),
            ("detok", t3, t4),
            ("filter", t4, t5),
        ):
            parts[key].append(b - a)
    out = {k: round(statistics.median(v) * 1000, 4) for k, v in parts.items()}
    out["event_hop"] = round(_event_hop_ms(), 4)
    return out


def _event_hop_ms(n: int = 2000) -> float:
    """Median time from ``call_soon_threadsafe`` on another thread to the callback running."""

    async def main() -> float:
        loop = asyncio.get_running_loop()
        seen: list[float] = []
        done = asyncio.Event()

        def arrive(sent: float) -> None:
            seen.append(time.perf_counter() - sent)
            if len(seen) == n:
                done.set()

        def post() -> None:
            for _ in range(n):
                loop.call_soon_threadsafe(arrive, time.perf_counter())
                time.sleep(0.0002)

        threading.Thread(target=post).start()
        await done.wait()
        return statistics.median(seen) * 1000

    return asyncio.run(main())


def _endless(lm: Any) -> Any:
    """``lm`` without end-of-turn tokens (every sequence runs to its budget)."""
    import dataclasses

    return dataclasses.replace(lm, eos_token_ids=frozenset())


def _prompts(lm: Any, n: int, length: int) -> list[list[int]]:
    return [_prompt(lm, length, seed=1000 * i + 1) for i in range(n)]


def _generator(lm: Any, n: int, length: int) -> Any:
    """mlx-lm's ``BatchGenerator`` with ``n`` sequences of ``length``-token prompts, all
    past their prompts and decoding."""
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(
        lm.model,
        max_tokens=10**6,
        stop_tokens=[],
        prefill_step_size=2048,
        completion_batch_size=n,
        prefill_batch_size=min(n, 8),
    )
    gen.insert(_prompts(lm, n, length), max_tokens=[10**6] * n)
    while len(gen._generation_batch) < n:
        gen.next()
    return gen


def _runner(lm: Any, slots: int, step: int) -> tuple[Any, Any]:
    """An mlxd ``BatchRunner`` for ``lm`` without end-of-turn tokens, and that model."""
    from mlxd.config import EngineSettings
    from mlxd.engine.batch import BatchRunner
    from mlxd.engine.promptcache import PromptCache

    lm = _endless(lm)
    settings = EngineSettings(prefill_step_size=step, warmup=False, max_batch_size=slots)
    return BatchRunner(lm, settings, PromptCache(0)), lm


def _jobs(lm: Any, prompts: list[list[int]], first_id: int = 1) -> list[Any]:
    """Greedy runner jobs with an unbounded token budget, one per prompt."""
    from mlxd.engine.batch import Job
    from mlxd.engine.protocol import GenerationParams, GenerationRequest

    params = GenerationParams(max_tokens=10**6, temperature=0.0, top_p=1.0)
    return [
        Job(first_id + i, GenerationRequest(model=lm, prompt=p, params=params), _Sink())
        for i, p in enumerate(prompts)
    ]


def batch_floor(lm: Any, n: int, length: int, steps: int) -> float:
    """Aggregate tok/s of a bare batched loop on mlx-lm's batch cache."""
    import mlx.core as mx

    gen = _generator(lm, n, length)
    batch = gen._generation_batch
    cache = batch.prompt_cache
    y = batch._next_tokens

    def forward(y: Any) -> Any:
        logits = lm.model(y[:, None], cache=cache)[:, -1, :]
        return mx.argmax(logits, axis=-1)

    with mx.stream(gen.stream):
        nxt = forward(y)
        mx.async_eval(nxt)
        start = time.perf_counter()
        for _ in range(steps):
            y = nxt
            nxt = forward(y)
            mx.async_eval(nxt)
            y.tolist()
        end = time.perf_counter()
    gen.close()
    return n * steps / (end - start)


def _lean_step(self: Any) -> Any:
    """mlx-lm's ``GenerationBatch._step`` for greedy rows without logits processors, minus
    what such a batch does not need: no log-softmax, no per-row split of the logprobs."""
    import mlx.core as mx

    inputs = self._current_tokens = self._next_tokens
    logits = self.model(inputs[:, None], cache=self.prompt_cache)[:, -1, :]
    self._next_tokens = mx.argmax(logits, axis=-1)
    mx.async_eval(self._next_tokens)
    tokens = inputs.tolist()
    for sti, ti in zip(self.tokens, tokens, strict=True):
        sti.append(ti)
    return tokens, [None] * len(tokens)


def batch_generator(lm: Any, n: int, length: int, steps: int, lean: bool = False) -> float:
    from mlx_lm.generate import GenerationBatch

    gen = _generator(lm, n, length)
    gen.next()
    if lean:
        gen._generation_batch.__class__ = type(
            "LeanBatch", (GenerationBatch,), {"_step": _lean_step}
        )
    start = time.perf_counter()
    count = sum(len(gen.next()[1]) for _ in range(steps))
    end = time.perf_counter()
    gen.close()
    return count / (end - start)


def batch_runner(lm: Any, n: int, length: int, steps: int) -> tuple[float, float]:
    """Aggregate tok/s of mlxd's ``BatchRunner``, and the share of its step spent inside the
    generator's ``next()`` (0 for one sequence: the fast path has no generator)."""
    runner, lm = _runner(lm, n, 2048)
    jobs = _jobs(lm, _prompts(lm, n, length))
    for job in jobs:
        runner.add(job)
    while min(j.completion_tokens for j in jobs) < 2:
        runner.step()
    inner = [0.0]
    if n > 1:  # the share of a step spent inside the generator's next()
        nxt = runner._gen.next

        def timed() -> Any:
            t0 = time.perf_counter()
            try:
                return nxt()
            finally:
                inner[0] += time.perf_counter() - t0

        runner._gen.next = timed
    before = sum(j.completion_tokens for j in jobs)
    start = time.perf_counter()
    for _ in range(steps):
        runner.step()
    end = time.perf_counter()
    count = sum(j.completion_tokens for j in jobs) - before
    runner.fail_all_local()
    runner.close()
    return count / (end - start), inner[0] / (end - start)


def _busy(us: float) -> None:
    """Pure Python for ``us`` microseconds: holds the GIL as the event loop's work does."""
    end = time.perf_counter() + us / 1e6
    while time.perf_counter() < end:
        pass


def batch_engine(
    model: str | None, n: int, length: int, steps: int, loop_work_us: float = 0.0
) -> float:
    """Aggregate tok/s over the window in which all N streams are decoding (events through
    the asyncio loop; counted as text events, about one per token). ``loop_work_us``: Python
    the loop runs per text event, standing in for the server's HTTP work (an SSE frame)."""
    from mlxd.config import EngineSettings, ModelSettings
    from mlxd.engine import loader
    from mlxd.engine.core import Delta, Engine, GenerationParams, GenerationRequest

    load = loader.load
    loader.load = lambda *a, **k: _endless(load(*a, **k))  # type: ignore[assignment]
    settings = ModelSettings() if model is None else ModelSettings(path=model)
    engine = Engine(
        settings,
        EngineSettings(prefill_step_size=2048, warmup=False, max_batch_size=n, max_queue=n),
    )
    engine.start()
    try:
        assert engine.ready_event.wait(600), engine.load_error
        lm = engine.require_model()

        async def one(prompt: list[int]) -> list[float]:
            params = GenerationParams(max_tokens=steps + 40, temperature=0.0, top_p=1.0)
            job = engine.submit(GenerationRequest(model=lm, prompt=prompt, params=params))
            times = []
            async for ev in engine.collect(job):
                if isinstance(ev, Delta):
                    times.append(time.perf_counter())
                    if loop_work_us:
                        _busy(loop_work_us)
            return times

        async def main() -> float:
            runs = await asyncio.gather(*(one(p) for p in _prompts(lm, n, length)))
            lo = max(r[5] for r in runs)
            hi = min(r[-5] for r in runs)
            count = sum(sum(lo <= t <= hi for t in r) for r in runs)
            return count / (hi - lo)

        return asyncio.run(main())
    finally:
        engine.stop()
        loader.load = load  # type: ignore[assignment]


def batch_rates(
    lm: Any, model: str | None, streams: list[int], length: int, steps: int, rounds: int = 2
) -> list[dict[str, Any]]:
    """Per stream count: each in-process path ``rounds`` times, the paths asked in turn (the
    first one rotates each round, so a drifting host favours none); medians and every run."""
    import statistics

    rows = []
    for n in streams:
        share: list[float] = []

        def runner(n: int = n, share: list[float] = share) -> float:
            rate, inner = batch_runner(lm, n, length, steps)
            share.append(inner)
            return rate

        paths = [
            ("floor", lambda n=n: batch_floor(lm, n, length, steps)),
            ("batch_generator", lambda n=n: batch_generator(lm, n, length, steps)),
            ("lean_generator", lambda n=n: batch_generator(lm, n, length, steps, lean=True)),
            ("mlxd_runner", runner),
        ]
        runs: dict[str, list[float]] = {name: [] for name, _ in paths}
        for r in range(rounds):
            for name, fn in paths[r % len(paths) :] + paths[: r % len(paths)]:
                runs[name].append(round(fn(), 1))
        row: dict[str, Any] = {"streams": n}
        for name, values in runs.items():
            row[name] = round(statistics.median(values), 1)
            row[f"{name}_runs"] = values
        row["runner_share_in_generator"] = round(statistics.median(share), 3)
        row["mlxd_engine"] = round(batch_engine(model, n, length, steps), 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def ramp(lm: Any, n: int, step: int, admission: str) -> dict[str, float]:
    from mlxd.engine import batch

    runner, lm = _runner(lm, n + 2, step)
    own = batch.prompt_rows
    if admission == "mlx-lm":
        batch.prompt_rows = lambda gen, chunk: 8  # type: ignore[assignment]
    try:
        # Two sequences already decoding, so the burst goes to the batch, as in a server.
        first = _jobs(lm, _prompts(lm, 2, 64))
        for job in first:
            runner.add(job)
        while min(j.completion_tokens for j in first) < 1:
            runner.step()
        prompts = [p[: 40 + i % 61] for i, p in enumerate(_prompts(lm, n, 100))]
        jobs = _jobs(lm, prompts, first_id=10)
        start = time.perf_counter()
        for job in jobs:
            runner.add(job)
        steps = 0
        while min(j.completion_tokens for j in jobs) < 1:
            runner.step()
            steps += 1
        end = time.perf_counter()
    finally:
        batch.prompt_rows = own  # type: ignore[assignment]
    runner.fail_all_local()
    runner.close()
    return {"ms": round((end - start) * 1000, 1), "steps": steps}


def ramps(lm: Any, streams: list[int], step: int) -> list[dict[str, Any]]:
    rows = []
    for n in streams:
        row: dict[str, Any] = {"streams": n}
        for admission in ("mlx-lm", "mlxd"):
            runs = [ramp(lm, n, step, admission) for _ in range(3)]
            row[admission] = {
                "first_ms": runs[0]["ms"],
                "best_ms": min(r["ms"] for r in runs),
                "steps": runs[-1]["steps"],
            }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _chunk_ms(lm: Any, offset: int, length: int) -> float:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(lm.model)
    if offset:
        lm.model(mx.array(_prompt(lm, offset, seed=7))[None], cache=cache)
        mx.eval([c.state for c in cache])
    tokens = mx.array(_prompt(lm, length, seed=11))[None]
    t0 = time.perf_counter()
    lm.model(tokens, cache=cache)
    mx.eval([c.state for c in cache])
    return (time.perf_counter() - t0) * 1000


def shape_costs(lm: Any) -> list[dict[str, Any]]:
    cases = [("length", 27, n) for n in (29, 30, 31, 33, 34, 35)]
    cases += [("offset", o, 32) for o in (28, 29, 30, 31)]
    cases += [("offset0", 0, n) for n in (40, 41, 42)]
    cases += [("rounded", 27, 64), ("rounded", 28, 64), ("rounded", 29, 64)]
    rows = []
    _chunk_ms(lm, 16, 16)  # the model's first run
    for kind, offset, length in cases:
        first = _chunk_ms(lm, offset, length)
        again = min(_chunk_ms(lm, offset, length) for _ in range(3))
        row = {"kind": kind, "offset": offset, "length": length}
        row |= {"first_ms": round(first, 2), "again_ms": round(again, 2)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


class _StaticCache:
    """One layer's KV cache as a fixed-size buffer: the step writes at ``offset`` (an array)
    and attends to the whole buffer under a mask, so every decoding step has the same shapes
    and ``mx.compile`` can trace it once."""

    def __init__(self, keys: Any, values: Any, offset: Any) -> None:
        self.keys, self.values, self.offset = keys, values, offset

    def update_and_fetch(self, k: Any, v: Any) -> tuple[Any, Any]:
        import mlx.core as mx

        self.keys = mx.slice_update(self.keys, k, self.offset, axes=(2,))
        self.values = mx.slice_update(self.values, v, self.offset, axes=(2,))
        return self.keys, self.values

    def make_mask(self, n: int, return_array: bool = False, window_size: Any = None) -> Any:
        import mlx.core as mx

        return (mx.arange(self.keys.shape[2]) < self.offset + n)[None]


def decode_static(lm: Any, prompt: list[int], n: int, compiled: bool) -> dict[str, Any]:
    """Greedy decode of one sequence on :class:`_StaticCache` buffers (plain KV cache for
    the prompt, then copied in), the step traced by ``mx.compile`` or not: tokens per second,
    the host time spent building each step's graph, and the tokens (to compare)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(lm.model)
    logits = lm.model(mx.array(prompt)[None], cache=cache)[:, -1, :]
    first = mx.argmax(logits, axis=-1)
    mx.eval(first, [c.state for c in cache])
    size = (len(prompt) + n + 255) // 256 * 256
    bufs = []
    for c in cache:
        k, v, filled = c.state
        for a in (k, v):
            buf = mx.zeros((a.shape[0], a.shape[1], size, a.shape[3]), a.dtype)
            buf[:, :, :filled, :] = a[:, :, :filled, :]
            bufs.append(buf)
    del cache
    mx.eval(bufs)
    layers = len(bufs) // 2
    model = lm.model

    def step(token: Any, offset: Any, *bufs: Any) -> list[Any]:
        caches = [_StaticCache(bufs[2 * i], bufs[2 * i + 1], offset) for i in range(layers)]
        logits = model(token, cache=caches)[:, -1, :]
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        out = [mx.argmax(logprobs, axis=-1)]
        for c in caches:
            out += [c.keys, c.values]
        return out

    fn = mx.compile(step) if compiled else step
    offset = mx.array(len(prompt), mx.int32)
    tokens = [first.item()]
    out = fn(first.reshape(1, 1), offset, *bufs)
    del bufs
    mx.async_eval(out)
    build = 0.0
    start = time.perf_counter()
    for i in range(n - 1):
        token = out[0]
        offset = offset + 1
        t0 = time.perf_counter()
        out = fn(token.reshape(1, 1), offset, *out[1:])
        build += time.perf_counter() - t0
        mx.async_eval(out)
        tokens.append(token.item())
        if i == 0:  # the first step traced (and compiled kernels): not timed
            start = time.perf_counter()
            build = 0.0
    steps = max(1, n - 2)
    return {
        "decode_tps": round(steps / (time.perf_counter() - start), 1),
        "build_ms": round(build / steps * 1e3, 3),
        "tokens": tokens[:n],
    }


def static_rates(lm: Any, prompt: list[int], n: int, rounds: int = 2) -> list[dict[str, Any]]:
    """``stream_generate`` against the static buffer, plain and compiled, in turn, greedy;
    ``same``: the path's tokens equal ``stream_generate``'s."""
    from mlx_lm import stream_generate

    rows: list[dict[str, Any]] = []
    for _ in range(rounds):
        reference: list[int] = []
        start = 0.0
        for i, r in enumerate(stream_generate(lm.model, lm.tokenizer, prompt, max_tokens=n)):
            if i == 1:
                start = time.perf_counter()
            reference.append(r.token)
        rows.append(
            {
                "path": "stream_generate",
                "decode_tps": round((len(reference) - 2) / (time.perf_counter() - start), 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        for compiled in (False, True):
            r = decode_static(lm, prompt, n, compiled)
            tokens = r.pop("tokens")
            rows.append(
                {
                    "path": "static compiled" if compiled else "static",
                    **r,
                    "same": tokens == reference[: len(tokens)],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def prefill_curve(lm: Any, contexts: list[int], chunks: list[int]) -> list[dict[str, Any]]:
    import mlx.core as mx
    from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache

    rows = []
    probe = make_prompt_cache(lm.model)
    if not all(type(c) is KVCache for c in probe):
        return rows
    lm.model(mx.array([[1, 2]]), cache=probe)
    mx.eval([c.state for c in probe])
    shapes = [(c.keys.shape[1], c.keys.shape[3], c.keys.dtype) for c in probe]
    for L in contexts:
        for C in chunks:
            for kind in ("plain", "batch"):
                timings = []
                for _ in range(2):
                    cache = []
                    for heads, dim, dtype in shapes:
                        c = KVCache()
                        if L:
                            k = mx.random.normal((1, heads, L, dim)).astype(dtype)
                            c.state = (k, k, L)
                        cache.append(c)
                    if kind == "batch":
                        cache = [BatchKVCache.merge([c]) for c in cache]
                    mx.eval([c.state for c in cache])
                    tokens = mx.array(list(range(5, 5 + C)))[None]
                    t0 = time.perf_counter()
                    lm.model(tokens, cache=cache)
                    mx.eval([c.state for c in cache])
                    timings.append(time.perf_counter() - t0)
                rows.append(
                    {"context": L, "chunk": C, "cache": kind, "tok_s": round(C / min(timings), 1)}
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows


def loop_load(
    model: str | None, streams: list[int], steps: int, works: list[float], rounds: int
) -> list[dict[str, Any]]:
    """The Engine's aggregate rate with the event loop doing ``works`` microseconds of Python
    per token, asked in turn: what the server's HTTP work in the same process (and GIL) costs
    the engine, and so what serving HTTP from a separate process could win."""
    import statistics

    rows = []
    for n in streams:
        runs: dict[float, list[float]] = {w: [] for w in works}
        for r in range(rounds):
            for w in works[r % len(works) :] + works[: r % len(works)]:
                runs[w].append(round(batch_engine(model, n, 64, steps, w), 1))
        for w, values in runs.items():
            row = {"streams": n, "loop_work_us": w, "median": statistics.median(values)}
            row["runs"] = values
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model path (default: the bundled model)")
    p.add_argument("--tokens", type=int, default=200, help="tokens to decode per run")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens of the decode runs")
    p.add_argument("--step", type=int, default=2048, help="prefill chunk of the decode runs")
    p.add_argument("--contexts", type=int, nargs="*", default=[0, 2048, 6144])
    p.add_argument("--chunks", type=int, nargs="*", default=[512])
    p.add_argument("--streams", type=int, nargs="*", default=[1, 8, 32, 64, 128])
    p.add_argument("--batch-steps", type=int, default=100, help="steps timed per batch run")
    p.add_argument(
        "--batch-rounds", type=int, default=2, help="runs of each batch path, asked in turn"
    )
    p.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["decode", "breakdown", "batch", "ramp", "shapes", "static", "prefill"],
    )
    p.add_argument(
        "--loop-work",
        type=float,
        nargs="*",
        default=[],
        help="section loop: the Engine's rate with this much Python (us) per token in the loop",
    )
    p.add_argument("--loop-rounds", type=int, default=3, help="runs of each --loop-work value")
    p.add_argument("--no-eos", action="store_true", help="forbid end-of-turn tokens")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    global NO_EOS
    NO_EOS = args.no_eos

    from mlxd import backend

    backend.apply_cuda_env_defaults()  # as mlxd does, before MLX is imported
    backend.preload_blas("auto")
    import mlx.core as mx

    lm, _ = _load(args.model)
    out: dict[str, Any] = {"device": str(mx.default_device()), "model": lm.describe()}
    prompt = _prompt(lm, args.prompt)
    if "decode" not in args.skip:
        runs: dict[str, Any] = {}
        for _ in range(2):  # the first round also warms kernels up; keep the best
            for name, fn in (
                ("stream_generate", lambda: decode_stream_generate(lm, prompt, args.tokens)),
                (
                    "batch_generator_1",
                    lambda: decode_batch_generator(lm, prompt, args.tokens, args.step),
                ),
                ("mlxd_runner", lambda: decode_runner(lm, prompt, args.tokens, args.step)),
            ):
                r = fn()
                best = runs.get(name)
                if best is None or r["decode_tps"] > best["decode_tps"]:
                    runs[name] = {k: round(v, 1) for k, v in r.items()}
                print(name, json.dumps(r), flush=True)
        r = decode_engine(args.model, prompt, args.tokens, args.step)
        runs["mlxd_engine"] = {k: round(v, 1) for k, v in r.items()}
        print("mlxd_engine", json.dumps(r), flush=True)
        out["decode"] = runs
    if "breakdown" not in args.skip:
        out["breakdown_ms"] = breakdown(lm, prompt, min(args.tokens, 100))
        print("breakdown", json.dumps(out["breakdown_ms"]), flush=True)
    if "batch" not in args.skip:
        out["batch"] = batch_rates(
            lm, args.model, args.streams, 64, args.batch_steps, args.batch_rounds
        )
    if args.loop_work:
        out["loop"] = loop_load(
            args.model, args.streams, args.batch_steps, args.loop_work, args.loop_rounds
        )
    if "ramp" not in args.skip:
        out["ramp"] = ramps(lm, args.streams, args.step)
    if "shapes" not in args.skip:
        out["shapes"] = shape_costs(lm)
    if "static" not in args.skip:
        out["static"] = static_rates(lm, prompt, args.tokens)
    if "prefill" not in args.skip:
        out["prefill"] = prefill_curve(lm, args.contexts, args.chunks)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
