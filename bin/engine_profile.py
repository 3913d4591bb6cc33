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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model path (default: the bundled model)")
    p.add_argument("--tokens", type=int, default=200, help="tokens to decode per run")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens of the decode runs")
    p.add_argument("--step", type=int, default=2048, help="prefill chunk of the decode runs")
    p.add_argument("--contexts", type=int, nargs="*", default=[0, 2048, 6144])
    p.add_argument("--chunks", type=int, nargs="*", default=[512])
    p.add_argument("--skip", nargs="*", default=[], choices=["decode", "breakdown", "prefill"])
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
    if "prefill" not in args.skip:
        out["prefill"] = prefill_curve(lm, args.contexts, args.chunks)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
