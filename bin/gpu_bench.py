"""Helpers of ``bin/gpu-bench`` that run on the GPU machine (see docs/gpu.md).

``build-model DIR --tokenizer TOK [--bits N]``
    A random-weight Llama (~1.07B: hidden 2048, 16 layers, 32 heads, 8 KV heads,
    intermediate 8192, vocab 49152) in bfloat16, optionally quantized, saved as an MLX
    directory with the tokenizer files of TOK (the bundled SmolLM2's, same vocabulary). The
    EOS embedding rows are zeroed so greedy decoding of random weights never stops early.

``probe --config CFG --model DIR --state DIR --out JSON``
    Starts mlxd, waits for /health, then checks that no request after ready waits for kernel
    compilation: ten sequential short requests (TTFT of each), a request at a temperature
    never used before (0.33: TTFT against the tenth's, kernels before/after), a burst of
    ``max_batch_size``
    concurrent streams, a long prompt, and a temperature/top-p request; counts the compiled
    kernels in ``MLX_PTX_CACHE_DIR`` at ready and after each phase (a growing count means a
    request compiled something). Writes what it saw, including the ``model.loaded`` log event
    (``warmup_seconds``, backend), as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "daemon"))

# The one daemon harness and streaming client, shared with bin/bench and the e2e tests.
from mlxd.bench.client import stream_chat  # noqa: E402
from mlxd.bench.harness import Daemon  # noqa: E402
from mlxd.bench.workload import prefill_text, tagged  # noqa: E402

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def build_model(out: Path, tokenizer: Path, bits: int, layers: int = 16) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 2048,
        "num_hidden_layers": layers,
        "intermediate_size": 8192,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "rms_norm_eps": 1e-5,
        "vocab_size": 49152,
        "rope_theta": 100000.0,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": [2],
        "torch_dtype": "bfloat16",
    }
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.set_dtype(mx.bfloat16)
    emb = model.model.embed_tokens.weight
    model.model.embed_tokens.weight = emb * (mx.arange(emb.shape[0]) != 2)[:, None].astype(
        emb.dtype
    )
    if bits:
        import mlx.nn as nn

        nn.quantize(model, group_size=64, bits=bits)
        config["quantization"] = {"group_size": 64, "bits": bits}
    out.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (tokenizer / name).exists():
            shutil.copy(tokenizer / name, out / name)
    n = sum(v.size for v in weights.values())
    print(f"built {out}: {n / 1e9:.2f}B stored parameters, bits={bits or 'bf16'}")


def _kernel_dir(state: Path) -> Path:
    """Where mlxd keeps compiled kernels: $MLX_PTX_CACHE_DIR, else under its state dir."""
    from importlib.metadata import version

    env = os.environ.get("MLX_PTX_CACHE_DIR")
    return Path(env) if env else state / "kernels" / f"mlx-{version('mlx')}"


def _count(cache: Path) -> int:
    return len(list(cache.glob("*.ptx"))) if cache.is_dir() else 0


def probe(args: argparse.Namespace) -> None:
    state = Path(args.state)
    t0 = time.monotonic()
    daemon = Daemon.start(
        Path(args.config),
        state_dir=state,
        log=Path(args.log),
        env={"MLXD_MODEL__PATH": args.model, "MLXD_SERVER__HOST": "127.0.0.1"},
        cwd=ROOT,
    )
    cache = _kernel_dir(state)

    def _kernels() -> int:
        return _count(cache)

    out: dict[str, Any] = {
        "label": args.label,
        "kernel_cache": str(cache),
        "MLX_CUDA_USE_CUDNN_SDPA": os.environ.get("MLX_CUDA_USE_CUDNN_SDPA"),
        "kernels_at_start": _kernels(),
    }
    try:
        body = daemon.wait_ready(args.timeout)
        out["seconds_to_ready"] = round(time.monotonic() - t0, 2)
        out["health_backend"] = body.get("backend")
        out["kernels_at_ready"] = _kernels()
        logfile = state / "logs" / "mlxd.log"
        for line in logfile.read_text().splitlines():
            if '"model.loaded"' in line:
                out["model_loaded"] = json.loads(line)
        # 1. ten sequential short requests: the first must not be slower than the others.
        seq = []
        for i in range(10):
            msg = [{"role": "user", "content": tagged(f"probe {i}", "Say hello.")}]
            r = stream_chat(daemon, msg, 16, 600)
            seq.append(round(r.ttft * 1000, 1))
        out["sequential_ttft_ms"] = seq
        out["first_over_tenth"] = round(seq[0] / seq[9], 2)
        out["kernels_after_sequential"] = _kernels()
        # 1b. a temperature never used before (not the model's default, not the warm-up's):
        # must reuse the compiled sampler (temperature is an array input), so its TTFT stays
        # near the tenth request's and the kernel count does not grow. Same prompt shape as
        # the sequential requests; a second one at another new temperature for comparison.
        new_temp = []
        for i, temp in enumerate((0.33, 0.47)):
            msg = [{"role": "user", "content": tagged(f"probes {i}", "Say hello.")}]
            r = stream_chat(daemon, msg, 16, 600, temperature=temp)
            new_temp.append(
                {
                    "temperature": temp,
                    "ttft_ms": round(r.ttft * 1000, 1),
                    "prompt_tokens": r.prompt_tokens,
                }
            )
        out["new_temperature"] = {
            "requests": new_temp,
            "over_tenth": round(new_temp[0]["ttft_ms"] / seq[9], 2),
            "kernels_before": out["kernels_after_sequential"],
            "kernels_after": _kernels(),
        }
        # 2. a burst of max_batch_size concurrent streams
        n = args.burst
        res: list[Any] = [None] * n

        def one(i: int) -> None:
            msg = [{"role": "user", "content": tagged(f"burst {i}", "Write a long story.")}]
            res[i] = stream_chat(daemon, msg, 64, 600)

        start = time.perf_counter()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out["burst"] = {
            "streams": n,
            "seconds": round(time.perf_counter() - start, 2),
            "worst_ttft_ms": round(max(r.ttft for r in res) * 1000, 1),
            "tokens": sum(r.completion_tokens for r in res),
        }
        out["kernels_after_burst"] = _kernels()
        # 3. a long prompt (several prefill chunks), twice (different text: no cache hit)
        longs = []
        for i in range(2):
            doc = prefill_text(args.long_tokens)
            msg = [{"role": "user", "content": tagged(f"long {i}", doc)}]
            r = stream_chat(daemon, msg, 8, 600)
            longs.append({"prompt_tokens": r.prompt_tokens, "ttft_ms": round(r.ttft * 1000, 1)})
        out["long_prompt"] = longs
        out["kernels_after_long"] = _kernels()
        # 4. sampling: the model's default temperature/top-p, then another temperature
        samp = []
        for i, temp in enumerate((None, None, 0.9, 0.9)):
            msg = [{"role": "user", "content": f"[temp {i}] Say hi."}]
            r = stream_chat(daemon, msg, 8, 600, temperature=temp)
            samp.append(round(r.ttft * 1000, 1))
        out["sampling_ttft_ms"] = {"default x2": samp[:2], "temperature 0.9 x2": samp[2:]}
        out["kernels_after_sampling"] = _kernels()
    finally:
        daemon.stop(timeout=30)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(prog="gpu_bench")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-model")
    b.add_argument("out")
    b.add_argument("--tokenizer", required=True)
    b.add_argument("--bits", type=int, default=0)
    b.add_argument("--layers", type=int, default=16, help="16: ~1.07B parameters")
    q = sub.add_parser("probe")
    q.add_argument("--config", required=True)
    q.add_argument("--model", required=True)
    q.add_argument("--state", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--log", required=True)
    q.add_argument("--label", default="")
    q.add_argument("--burst", type=int, default=32)
    q.add_argument("--long-tokens", type=int, default=3000)
    q.add_argument("--timeout", type=float, default=480)
    args = p.parse_args()
    if args.cmd == "build-model":
        build_model(Path(args.out), Path(args.tokenizer), args.bits, args.layers)
    else:
        probe(args)


if __name__ == "__main__":
    main()
