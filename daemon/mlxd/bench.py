"""``bin/bench``: mlxd and ``mlx_lm.server`` side by side on the same model and workload.

Both servers are started as subprocesses on free loopback ports (mlxd with a temporary config
and state directory; the reference with the same weights, exported from a GGUF with
``mlxd export-model`` when needed, and its default settings), then driven over HTTP with the
same streaming Chat Completions requests at temperature 0. Every request starts with a tag
that differs per suite, repeat and stream, so no measurement is a prompt-cache hit of an
earlier one (except the growing conversation, where reuse is the point); both servers get
exactly the same request bodies, interleaved repeat by repeat so that background load hits
both alike. Finally an in-process ``mlx_lm.stream_generate`` run, in its own subprocess with
mlxd's BLAS and model loading, shows how much the HTTP server costs.

Output: one JSON line per measurement on stdout (``server``, ``metric``, ``value`` = median
over ``--repeats``, ``min``, ``max``, ``unit`` and the parameters), ``setup`` lines that say
what each side ran with (BLAS, dtype, flags), a ratio table (mlxd / mlx_lm.server) on stderr
(stdout with ``--table``), and with ``--out`` everything as one JSON document.

This module needs only the standard library (plus mlxd itself); it never imports mlx
except inside the in-process worker subprocess, after choosing the BLAS.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import BUNDLED_MODEL, PROJECT_ROOT, ConfigError, load_settings

MLXD = "mlxd"
REFERENCE = "mlx_lm.server"
INPROCESS = "mlx_lm-inprocess"

# Prompts that make a small instruct model write at length (no ignore_eos needed).
LONG_PROMPTS = (
    "Write a long, detailed essay about the history of the Roman Empire, from its founding "
    "to its fall.",
    "Explain in detail how the human heart works, step by step.",
    "Write a long story about a young girl who discovers a hidden city under the sea.",
    "Describe in detail the process of photosynthesis and why it matters for life on Earth.",
    "Write a detailed guide to planting and caring for a vegetable garden.",
    "Explain how computers work, from transistors to operating systems, in detail.",
    "Write a long letter from a sailor to his family describing a voyage around the world.",
    "Describe the water cycle in detail, with examples from different climates.",
)
FOLLOW_UPS = (
    "Tell me about the history of the city of Paris.",
    "What are the most famous buildings there?",
    "Describe one of them in more detail.",
    "Who built it, and when?",
    "What is the food like in that city?",
    "Give me a recipe for a typical dish from there.",
    "How would I make it vegetarian?",
    "What wine or drink goes well with it?",
    "Plan a three-day visit to the city for me.",
    "Summarize everything we talked about.",
)
_COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "silver", "golden")
_ANIMALS = ("fox", "owl", "horse", "rabbit", "whale", "tiger", "sparrow", "turtle", "wolf")
_FOODS = ("apples", "bread", "cherries", "carrots", "honey", "rice", "plums", "cheese", "beans")
_TOKENS_PER_SENTENCE = 17  # SmolLM2's tokenizer on the sentences below (digits split)

#: mlx_lm.server defaults worth knowing when reading its numbers (from its --help).
REFERENCE_DEFAULTS = {
    "max_tokens": 512,
    "prefill_step_size": 2048,
    "prompt_cache_size": 10,
    "decode_concurrency": 32,
    "prompt_concurrency": 8,
    "temp": 0.0,
}


class BenchError(Exception):
    """The benchmark cannot go on; the message says which server and why."""


# -- workload ----------------------------------------------------------------------------------
def tagged(tag: str, text: str) -> str:
    """A request text that no earlier request shares a prefix with (beyond the template)."""
    return f"[{tag}] {text}"


def prefill_text(target_tokens: int) -> str:
    """A deterministic document of roughly ``target_tokens`` tokens and a short question."""
    n = max(1, (target_tokens - 40) // _TOKENS_PER_SENTENCE)
    lines = [
        f"In room {i} the {_COLORS[i % 8]} {_ANIMALS[i % 9]} ate some {_FOODS[i % 9]} and then "
        "slept until morning."
        for i in range(1, n + 1)
    ]
    return " ".join(lines) + f"\n\nQuestion: what did the animal in room {n // 2 + 1} eat?"


@dataclass(frozen=True)
class Workload:
    """Every size the suites use; ``--quick`` shrinks it for the smoke test."""

    repeats: int
    max_tokens: int
    prefill_tokens: int
    concurrency: tuple[int, ...]
    turns: int
    turn_max_tokens: int
    warmups: int = 2

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Workload:
        if args.quick:
            base = cls(1, 8, 60, (1, 2), 3, 4, warmups=1)
        else:
            base = cls(3, 200, 1000, (1, 4, 8), 10, 48)
        return cls(
            repeats=args.repeats or base.repeats,
            max_tokens=args.max_tokens or base.max_tokens,
            prefill_tokens=args.prefill_tokens or base.prefill_tokens,
            concurrency=tuple(args.concurrency) if args.concurrency else base.concurrency,
            turns=min(args.turns or base.turns, len(FOLLOW_UPS)),
            turn_max_tokens=args.turn_max_tokens or base.turn_max_tokens,
            warmups=base.warmups,
        )


# -- HTTP client (stdlib only) -----------------------------------------------------------------
@dataclass
class StreamResult:
    """Timings of one streamed generation, seconds from just before the request was sent."""

    ttft: float  # first generated text (or the final chunk, if the text came only there)
    last: float  # the last chunk that carried text or the finish
    end: float  # the stream closed
    completion_tokens: int
    prompt_tokens: int
    cached_tokens: int | None
    text: str
    response_id: str | None = None
    started_at: float = 0.0  # perf_counter() at send, to line up concurrent streams

    @property
    def decode_tokens_per_s(self) -> float | None:
        span = self.last - self.ttft
        if self.completion_tokens < 2 or span <= 0:
            return None
        return (self.completion_tokens - 1) / span


class HttpStatusError(BenchError):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status


def _sse(resp: http.client.HTTPResponse) -> Iterator[tuple[str | None, str]]:
    """(event name, data) per SSE frame; comment lines (keepalives) are skipped."""
    event: str | None = None
    data: list[str] = []
    while True:
        raw = resp.readline()
        if not raw:
            break
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = None, []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield event, "\n".join(data)


def _post_stream(
    server: Server, path: str, body: dict[str, Any], timeout: float
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse, float]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    payload = json.dumps(body).encode()
    conn.connect()
    started = time.perf_counter()
    conn.request(
        "POST",
        path,
        body=payload,
        headers={
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
            **server.headers,
        },
    )
    resp = conn.getresponse()
    if resp.status != 200:
        text = resp.read().decode("utf-8", "replace")
        conn.close()
        raise HttpStatusError(resp.status, text)
    return conn, resp, started


def stream_chat(
    server: Server, messages: list[dict[str, str]], max_tokens: int, timeout: float
) -> StreamResult:
    """One streamed Chat Completion at temperature 0; token counts from the usage chunk."""
    body = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    conn, resp, started = _post_stream(server, "/v1/chat/completions", body, timeout)
    first: float | None = None
    last = 0.0
    usage: dict[str, Any] | None = None
    text: list[str] = []
    try:
        for _, data in _sse(resp):
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise BenchError(f"stream failed: {chunk['error']}")
            now = time.perf_counter() - started
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") or {}
                piece = (delta.get("content") or "") + (
                    delta.get("reasoning_content") or delta.get("reasoning") or ""
                )
                text.append(delta.get("content") or "")
                if piece or choice.get("finish_reason"):
                    if first is None:
                        first = now
                    last = now
        end = time.perf_counter() - started
    finally:
        conn.close()
    if usage is None or first is None:
        raise BenchError("the stream ended without text or without a usage chunk")
    details = usage.get("prompt_tokens_details") or {}
    return StreamResult(
        ttft=first,
        last=last,
        end=end,
        completion_tokens=int(usage["completion_tokens"]),
        prompt_tokens=int(usage["prompt_tokens"]),
        cached_tokens=details.get("cached_tokens"),
        text="".join(text),
        started_at=started,
    )


def stream_response(
    server: Server, text: str, previous_id: str | None, max_tokens: int, timeout: float
) -> StreamResult:
    """One streamed ``POST /v1/responses`` turn chained with ``previous_response_id``."""
    body: dict[str, Any] = {
        "input": text,
        "max_output_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    if previous_id:
        body["previous_response_id"] = previous_id
    conn, resp, started = _post_stream(server, "/v1/responses", body, timeout)
    first: float | None = None
    last = 0.0
    final: dict[str, Any] | None = None
    response_id: str | None = None
    try:
        for _, data in _sse(resp):
            event = json.loads(data)
            kind = event.get("type", "")
            now = time.perf_counter() - started
            if kind == "response.created":
                response_id = event["response"]["id"]
            elif kind == "response.output_text.delta" and event.get("delta"):
                if first is None:
                    first = now
                last = now
            elif kind in ("response.completed", "response.incomplete"):
                final = event["response"]
                last = now
                first = now if first is None else first
            elif kind in ("response.failed", "error"):
                raise BenchError(f"response stream failed: {data[:300]}")
        end = time.perf_counter() - started
    finally:
        conn.close()
    if final is None or first is None or not final.get("usage"):
        raise BenchError("the response stream ended without a completed response")
    usage = final["usage"]
    out_text = "".join(
        part.get("text", "")
        for item in final.get("output") or ()
        for part in item.get("content") or ()
    )
    return StreamResult(
        ttft=first,
        last=last,
        end=end,
        completion_tokens=int(usage["output_tokens"]),
        prompt_tokens=int(usage["input_tokens"]),
        cached_tokens=(usage.get("input_tokens_details") or {}).get("cached_tokens"),
        text=out_text,
        response_id=response_id or final.get("id"),
        started_at=started,
    )


def get_json(port: int, path: str, timeout: float = 5.0) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw or b"null")
        except json.JSONDecodeError:
            return resp.status, raw.decode("utf-8", "replace")
    finally:
        conn.close()


# -- server processes --------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM if the bench dies without cleaning up (even SIGKILL)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start a child in its own session (Ctrl-C reaches only the bench, which stops it)."""
    with log.open("wb") as err:
        return subprocess.Popen(
            cmd,
            cwd=PROJECT_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # preexec_fn is not thread-safe; the bench spawns from its main thread only.
            preexec_fn=_die_with_parent,
        )


def terminate(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int | None:
    """SIGTERM, wait, then SIGKILL: never leaves the process behind."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(10)
    return proc.returncode


@dataclass
class Server:
    """One server under test."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    command: list[str]
    info: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)  # Authorization, when keys are set

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def poll_ready(self) -> dict[str, Any] | None:
        """The /health body once ready, else None; raises if the process has exited."""
        if self.process.poll() is not None:
            raise BenchError(
                f"{self.name} exited with {self.process.returncode} before it was ready:\n"
                f"{self.log_tail()}"
            )
        try:
            status, body = get_json(self.port, "/health", timeout=2.0)
        except OSError:
            return None
        if status != 200:
            return None
        return body if isinstance(body, dict) else {}


def wait_ready(servers: list[Server], timeout: float) -> None:
    """Wait for every server at once, so one that dies is reported without delay."""
    deadline = time.monotonic() + timeout
    pending = list(servers)
    while pending:
        for s in list(pending):
            health = s.poll_ready()
            if health is not None:
                s.info["health"] = health
                pending.remove(s)
        if pending and time.monotonic() > deadline:
            names = ", ".join(s.name for s in pending)
            raise BenchError(f"{names} not ready after {timeout:.0f}s:\n{pending[0].log_tail()}")
        time.sleep(0.25)


def mapped_blas(pid: int) -> dict[str, Any]:
    """Which BLAS a running MLX process computes with, from its mapped libraries (Linux).

    numpy/scipy wheels carry a private OpenBLAS whose symbols are renamed
    (``scipy_cblas_sgemm64_``), so MLX cannot use it even though it is mapped; only an
    OpenBLAS with the plain ``cblas_*`` names (what mlxd preloads) replaces MLX's bundled one.
    """
    if sys.platform == "darwin":
        return {"blas": "Accelerate (macOS)"}
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return {"blas": "unknown"}
    libs = sorted({ln.split()[-1] for ln in maps.splitlines() if "blas" in ln.lower()})
    usable = [
        p
        for p in libs
        if "openblas" in p.lower()
        and "scipy_openblas" not in p
        and "numpy.libs" not in p
        and "scipy.libs" not in p
    ]
    if usable:
        blas = f"OpenBLAS ({usable[0]})"
    elif any("mlx_cpu.libs" in p for p in libs):
        blas = "mlx-bundled reference BLAS"
    else:
        blas = "unknown"
    return {"blas": blas, "blas_libraries_mapped": libs}


def describe_weights(model_dir: str) -> str:
    """'quantized 4-bit' / 'float16' ... from an MLX/HF directory's config.json."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "unknown"
    quant = config.get("quantization") or config.get("quantization_config")
    if isinstance(quant, dict):
        bits = sorted(
            {v["bits"] for v in quant.values() if isinstance(v, dict) and "bits" in v}
            | ({quant["bits"]} if "bits" in quant else set())
        )
        return "quantized " + "/".join(f"{b}-bit" for b in bits) + " (as stored)"
    return str(config.get("torch_dtype", "unknown")) + " (as stored)"


# -- results -----------------------------------------------------------------------------------
LOWER_IS_BETTER = {"ttft_ms", "worst_ttft_ms", "turn_ttft_ms"}


@dataclass
class Results:
    """Collects samples and emits one JSON line per (server, metric, parameters)."""

    stdout: Any = sys.stdout
    records: list[dict[str, Any]] = field(default_factory=list)
    setup: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def emit(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        print(json.dumps(record), file=self.stdout, flush=True)

    def measurement(
        self, server: str, metric: str, unit: str, samples: Sequence[float | None], **params: Any
    ) -> None:
        clean = [s for s in samples if s is not None]
        if not clean:
            self.skip(server, metric, "no valid sample (too few generated tokens?)", **params)
            return
        self.emit(
            {
                "server": server,
                "metric": metric,
                "value": round(statistics.median(clean), 3),
                "min": round(min(clean), 3),
                "max": round(max(clean), 3),
                "unit": unit,
                "repeats": len(clean),
                **params,
            }
        )

    def skip(self, server: str, metric: str, reason: str, **params: Any) -> None:
        self.notes.append(f"{server} {metric}: skipped: {reason}")
        self.emit(
            {"server": server, "metric": metric, "value": None, "unit": None, "skipped": reason}
            | params
        )

    def ratios(self) -> list[dict[str, Any]]:
        """mlxd / mlx_lm.server per matching measurement, and mlxd / in-process."""
        by_key: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        for r in self.records:
            if r.get("value") is None or r["metric"] == "setup":
                continue
            by_key.setdefault((r["metric"], _param_key(r)), {})[r["server"]] = r
        rows = []
        for (metric, params), servers in by_key.items():
            mine = servers.get(MLXD)
            if mine is None:
                continue
            for other in (REFERENCE, INPROCESS):
                theirs = servers.get(other)
                if theirs is None or not theirs["value"]:
                    continue
                rows.append(
                    {
                        "metric": metric,
                        "params": params,
                        "versus": other,
                        "mlxd": mine["value"],
                        "other": theirs["value"],
                        "unit": mine["unit"],
                        "ratio": round(mine["value"] / theirs["value"], 3),
                        "better": "lower" if metric in LOWER_IS_BETTER else "higher",
                    }
                )
        return rows


_NOT_PARAMS = {
    "server",
    "value",
    "min",
    "max",
    "unit",
    "repeats",
    "metric",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "skipped",
    "info",
}


def _param_key(record: dict[str, Any]) -> str:
    return " ".join(f"{k}={record[k]}" for k in sorted(record) if k not in _NOT_PARAMS)


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no ratios (only one side was measured)\n"
    head = ("metric", "params", "versus", "mlxd", "other", "unit", "ratio", "better")
    body = [
        (
            r["metric"],
            r["params"],
            r["versus"],
            f"{r['mlxd']:g}",
            f"{r['other']:g}",
            r["unit"],
            f"{r['ratio']:.2f}x",
            r["better"],
        )
        for r in rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body, strict=True)]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in (head, *body)
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "ratio = mlxd / other\n" + "\n".join(lines) + "\n"


def _median_int(values: list[int]) -> int:
    return int(statistics.median(values)) if values else 0


# -- suites ------------------------------------------------------------------------------------
@dataclass
class Bench:
    """Runs the suites against the started servers, interleaving them repeat by repeat."""

    servers: list[Server]
    work: Workload
    results: Results
    timeout: float

    def log(self, msg: str) -> None:
        print(f"bench: {msg}", file=sys.stderr, flush=True)

    def warmup(self) -> None:
        # mlx_lm.server loads its model on the first request; both get the same warm-up.
        for s in self.servers:
            for i in range(self.work.warmups):
                msg = [{"role": "user", "content": f"[warmup {i}] Say hello."}]
                stream_chat(s, msg, 4, self.timeout)

    def single_stream(self) -> None:
        w = self.work
        self.log(f"single stream: max_tokens={w.max_tokens}, {w.repeats} repeats")
        runs: dict[str, list[StreamResult]] = {s.name: [] for s in self.servers}
        for r in range(w.repeats):
            msg = [{"role": "user", "content": tagged(f"single {r}", LONG_PROMPTS[0])}]
            for s in self.servers:
                runs[s.name].append(stream_chat(s, msg, w.max_tokens, self.timeout))
        for name, rs in runs.items():
            params = _stream_params(rs, max_tokens=w.max_tokens)
            self.results.measurement(name, "ttft_ms", "ms", [x.ttft * 1000 for x in rs], **params)
            self.results.measurement(
                name,
                "decode_tokens_per_s",
                "tokens/s",
                [x.decode_tokens_per_s for x in rs],
                **params,
            )

    def prefill(self) -> None:
        w = self.work
        self.log(f"prefill: ~{w.prefill_tokens}-token prompt, {w.repeats} repeats")
        runs: dict[str, list[StreamResult]] = {s.name: [] for s in self.servers}
        doc = prefill_text(w.prefill_tokens)
        for r in range(w.repeats):
            msg = [{"role": "user", "content": tagged(f"prefill {r}", doc)}]
            for s in self.servers:
                runs[s.name].append(stream_chat(s, msg, 1, self.timeout))
        for name, rs in runs.items():
            self.results.measurement(
                name,
                "prefill_tokens_per_s",
                "tokens/s",
                [x.prompt_tokens / x.ttft for x in rs],
                **_stream_params(rs, max_tokens=1),
            )

    def concurrency(self) -> None:
        w = self.work
        for c in w.concurrency:
            self.log(f"concurrency {c}: max_tokens={w.max_tokens}, {w.repeats} repeats")
            agg: dict[str, list[float]] = {s.name: [] for s in self.servers}
            worst: dict[str, list[float]] = {s.name: [] for s in self.servers}
            tokens: dict[str, list[int]] = {s.name: [] for s in self.servers}
            for r in range(w.repeats):
                for s in self.servers:
                    rs = self._concurrent(s, c, r)
                    start = min(x.started_at for x in rs)
                    end = max(x.started_at + x.end for x in rs)
                    total = sum(x.completion_tokens for x in rs)
                    agg[s.name].append(total / (end - start))
                    worst[s.name].append(max(x.ttft for x in rs) * 1000)
                    tokens[s.name].append(total)
            for s in self.servers:
                params = {
                    "concurrency": c,
                    "max_tokens": w.max_tokens,
                    "completion_tokens": _median_int(tokens[s.name]),
                }
                self.results.measurement(
                    s.name, "aggregate_tokens_per_s", "tokens/s", agg[s.name], **params
                )
                self.results.measurement(s.name, "worst_ttft_ms", "ms", worst[s.name], **params)

    def _concurrent(self, s: Server, c: int, repeat: int) -> list[StreamResult]:
        barrier = threading.Barrier(c)
        out: list[StreamResult | BaseException | None] = [None] * c

        def one(i: int) -> None:
            text = tagged(f"c{c} {repeat}.{i}", LONG_PROMPTS[i % len(LONG_PROMPTS)])
            try:
                barrier.wait(30)
                out[i] = stream_chat(
                    s,
                    [{"role": "user", "content": text}],
                    self.work.max_tokens,
                    self.timeout,
                )
            except BaseException as exc:  # reported below, in the main thread
                out[i] = exc

        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(c)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.timeout + 60)
        for item in out:
            if isinstance(item, BaseException):
                raise BenchError(f"{s.name}, {c} concurrent streams: {item}") from item
            if item is None:
                raise BenchError(f"{s.name}, {c} concurrent streams: a stream did not finish")
        return [x for x in out if isinstance(x, StreamResult)]

    def chat_turns(self) -> None:
        w = self.work
        self.log(f"conversation (chat): {w.turns} turns, {w.repeats} repeats")
        ttft: dict[str, list[list[float]]] = {
            s.name: [[] for _ in range(w.turns)] for s in self.servers
        }
        meta: dict[str, list[list[StreamResult]]] = {
            s.name: [[] for _ in range(w.turns)] for s in self.servers
        }
        for r in range(w.repeats):
            for s in self.servers:
                history: list[dict[str, str]] = []
                for k in range(w.turns):
                    text = FOLLOW_UPS[k] if k else tagged(f"chat {r}", FOLLOW_UPS[0])
                    history.append({"role": "user", "content": text})
                    res = stream_chat(s, history, w.turn_max_tokens, self.timeout)
                    history.append({"role": "assistant", "content": res.text})
                    ttft[s.name][k].append(res.ttft * 1000)
                    meta[s.name][k].append(res)
        for s in self.servers:
            for k in range(w.turns):
                self.results.measurement(
                    s.name,
                    "turn_ttft_ms",
                    "ms",
                    ttft[s.name][k],
                    mode="chat",
                    turn=k + 1,
                    **_stream_params(meta[s.name][k], max_tokens=w.turn_max_tokens),
                )

    def responses_turns(self, server: Server) -> None:
        w = self.work
        self.log(f"conversation (responses, mlxd only): {w.turns} turns, {w.repeats} repeats")
        ttft: list[list[float]] = [[] for _ in range(w.turns)]
        meta: list[list[StreamResult]] = [[] for _ in range(w.turns)]
        for r in range(w.repeats):
            previous: str | None = None
            for k in range(w.turns):
                text = FOLLOW_UPS[k] if k else tagged(f"responses {r}", FOLLOW_UPS[0])
                try:
                    res = stream_response(server, text, previous, w.turn_max_tokens, self.timeout)
                except HttpStatusError as exc:
                    if exc.status in (404, 405) and r == 0 and k == 0:
                        self.results.skip(
                            server.name,
                            "turn_ttft_ms",
                            f"POST /v1/responses is not available ({exc})",
                            mode="responses",
                        )
                        return
                    raise
                previous = res.response_id
                ttft[k].append(res.ttft * 1000)
                meta[k].append(res)
        for k in range(w.turns):
            self.results.measurement(
                server.name,
                "turn_ttft_ms",
                "ms",
                ttft[k],
                mode="responses",
                turn=k + 1,
                **_stream_params(meta[k], max_tokens=w.turn_max_tokens),
            )


def _stream_params(rs: list[StreamResult], **extra: Any) -> dict[str, Any]:
    cached = [x.cached_tokens for x in rs if x.cached_tokens is not None]
    params = {
        **extra,
        "prompt_tokens": _median_int([x.prompt_tokens for x in rs]),
        "completion_tokens": _median_int([x.completion_tokens for x in rs]),
    }
    if cached:
        params["cached_tokens"] = _median_int(cached)
    return params


# -- in-process reference (runs in a subprocess) -----------------------------------------------
def inprocess_worker(spec_path: Path, out_path: Path) -> int:
    """Load the model exactly as mlxd does and time ``mlx_lm.stream_generate``.

    Runs as its own process (``--inprocess-worker``) so the BLAS chosen here never leaks
    into the bench process.
    """
    spec = json.loads(spec_path.read_text())
    from .backend import device_info, preload_blas

    settings = load_settings(Path(spec["config"]))
    choice = preload_blas(settings.engine.blas)

    from mlx_lm import stream_generate

    from .engine.loader import load
    from .prompt import build_prompt

    lm = load(settings.model)
    step = settings.engine.prefill_step_size

    def run(messages: list[dict[str, str]], max_tokens: int) -> dict[str, float | int]:
        ids = build_prompt(lm, messages).ids
        start = time.perf_counter()
        first = last = 0.0
        n = 0
        for _ in stream_generate(
            lm.model, lm.tokenizer, ids, max_tokens=max_tokens, prefill_step_size=step
        ):
            now = time.perf_counter() - start
            n += 1
            if n == 1:
                first = now
            last = now
        return {"ttft": first, "last": last, "prompt_tokens": len(ids), "completion_tokens": n}

    run([{"role": "user", "content": "[warmup] Say hello."}], 4)
    single = [
        run(
            [{"role": "user", "content": tagged(f"single {r}", LONG_PROMPTS[0])}],
            spec["max_tokens"],
        )
        for r in range(spec["repeats"])
    ]
    doc = prefill_text(spec["prefill_tokens"])
    prefill = [
        run([{"role": "user", "content": tagged(f"prefill {r}", doc)}], 1)
        for r in range(spec["repeats"])
    ]
    out_path.write_text(
        json.dumps(
            {
                "single": single,
                "prefill": prefill,
                "info": {
                    "blas": choice.library or "mlx-bundled reference BLAS",
                    "blas_reason": choice.reason,
                    "device": device_info(),
                    "dtype": lm.dtype,
                    "prefill_step_size": step,
                    "versions": _versions(),
                },
            }
        )
    )
    return 0


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("mlx", "mlx-lm"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def run_inprocess(
    config: Path, env: dict[str, str], work: Workload, tmp: Path, results: Results, timeout: float
) -> None:
    spec = tmp / "inprocess.json"
    out = tmp / "inprocess-result.json"
    spec.write_text(
        json.dumps(
            {
                "config": str(config),
                "max_tokens": work.max_tokens,
                "prefill_tokens": work.prefill_tokens,
                "repeats": work.repeats,
            }
        )
    )
    cmd = [sys.executable, "-m", "mlxd.bench", "--inprocess-worker", str(spec), str(out)]
    proc = spawn(cmd, env, tmp / "inprocess.log")
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        terminate(proc, 5)
        raise BenchError(f"in-process run took longer than {timeout:.0f}s") from None
    finally:
        terminate(proc, 5)
    if proc.returncode != 0 or not out.exists():
        tail = (tmp / "inprocess.log").read_text(errors="replace")[-2000:]
        raise BenchError(f"in-process run failed ({proc.returncode}):\n{tail}")
    data = json.loads(out.read_text())
    results.setup[INPROCESS] = data["info"]
    results.emit(
        {"server": INPROCESS, "metric": "setup", "value": None, "unit": None, "info": data["info"]}
    )
    single, prefill = data["single"], data["prefill"]
    params = {
        "max_tokens": work.max_tokens,
        "prompt_tokens": _median_int([x["prompt_tokens"] for x in single]),
        "completion_tokens": _median_int([x["completion_tokens"] for x in single]),
    }
    results.measurement(INPROCESS, "ttft_ms", "ms", [x["ttft"] * 1000 for x in single], **params)
    decode = [
        (x["completion_tokens"] - 1) / (x["last"] - x["ttft"])
        for x in single
        if x["completion_tokens"] > 1 and x["last"] > x["ttft"]
    ]
    results.measurement(INPROCESS, "decode_tokens_per_s", "tokens/s", decode, **params)
    results.measurement(
        INPROCESS,
        "prefill_tokens_per_s",
        "tokens/s",
        [x["prompt_tokens"] / x["ttft"] for x in prefill],
        max_tokens=1,
        prompt_tokens=_median_int([x["prompt_tokens"] for x in prefill]),
        completion_tokens=1,
    )


# -- orchestration -----------------------------------------------------------------------------
def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXD_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def reference_model(model: str, config: Path, env: dict[str, str], tmp: Path) -> tuple[str, str]:
    """What ``mlx_lm.server --model`` gets for ``model``, and how it was obtained."""
    from .errors import ModelLoadError
    from .models.source import resolve

    try:
        source = resolve(model, download=False)
    except ModelLoadError:
        return model, "passed through (Hugging Face repo id)"
    if source.kind in ("directory", "huggingface"):
        return str(source.path), f"{source.kind} used as is"
    out = tmp / "reference-model"
    cmd = [sys.executable, "-m", "mlxd", "--config", str(config), "export-model", str(out)]
    done = subprocess.run(
        cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    if done.returncode != 0:
        raise BenchError(
            f"exporting {model} for mlx_lm.server failed ({done.returncode}): {done.stderr[-2000:]}"
        )
    return str(out), f"exported from {source.path} by `mlxd export-model` (dtype as stored)"


def run(args: argparse.Namespace) -> int:
    work = Workload.from_args(args)
    results = Results()
    user_config = Path(args.mlxd_config).expanduser() if args.mlxd_config else None
    try:
        base = load_settings(user_config)
    except ConfigError as exc:
        print(f"bench: --mlxd-config: {exc}", file=sys.stderr)
        return 2
    model = args.model or (base.model.path if user_config else BUNDLED_MODEL)
    if Path(model).expanduser().exists():  # the servers run in the project root
        model = str(Path(model).expanduser().resolve())
    try:
        keys = base.api_keys()
    except ConfigError as exc:
        print(f"bench: --mlxd-config: {exc}", file=sys.stderr)
        return 2
    servers: list[Server] = []
    tmp = Path(tempfile.mkdtemp(prefix="mlxd-bench-"))
    started = time.monotonic()
    try:
        config = tmp / "mlxd.toml"
        config.write_text(user_config.read_text() if user_config else "")
        mlxd_env = _child_env({"MLXD_MODEL__PATH": model})
        mlxd_port = args.mlxd_port or free_port()
        serve_env = {
            **mlxd_env,
            "MLXD_SERVER__PORT": str(mlxd_port),
            "MLXD_SERVER__HOST": "127.0.0.1",
            "MLXD_SERVER__STATE_DIR": str(tmp / "state"),
            "MLXD_LOGGING__FORMAT": "json",
        }
        cmd = [sys.executable, "-m", "mlxd", "--config", str(config)]
        auth = {"Authorization": f"Bearer {keys[0]}"} if keys else {}
        servers.append(
            Server(
                MLXD,
                mlxd_port,
                spawn(cmd, serve_env, tmp / "mlxd.log"),
                tmp / "mlxd.log",
                cmd,
                headers=auth,
            )
        )
        if args.reference:
            ref_model, how = reference_model(model, config, mlxd_env, tmp)
            ref_port = args.reference_port or free_port()
            cmd = [
                sys.executable,
                "-m",
                "mlx_lm",
                "server",
                "--model",
                ref_model,
                "--port",
                str(ref_port),
                "--host",
                "127.0.0.1",
                *args.reference_arg,
            ]
            ref = Server(
                REFERENCE,
                ref_port,
                spawn(cmd, _child_env({}), tmp / "reference.log"),
                tmp / "reference.log",
                cmd,
                {"model": ref_model, "model_source": how},
            )
            servers.append(ref)
        wait_ready(servers, args.start_timeout)
        bench = Bench(servers, work, results, args.request_timeout)
        bench.warmup()
        _record_setup(servers, results, model, work, args)
        suites = [x for x in ("single", "prefill", "concurrency", "turns") if x not in args.skip]
        for suite in suites:
            if suite == "single":
                bench.single_stream()
            elif suite == "prefill":
                bench.prefill()
            elif suite == "concurrency":
                bench.concurrency()
            else:
                bench.chat_turns()
                bench.responses_turns(servers[0])
        for s in servers:
            terminate(s.process)
        if "inprocess" not in args.skip:
            bench.log("in-process mlx_lm.stream_generate (subprocess)")
            run_inprocess(config, mlxd_env, work, tmp, results, args.request_timeout * 4)
    except (BenchError, OSError, http.client.HTTPException) as exc:
        print(f"bench: {type(exc).__name__}: {exc}", file=sys.stderr)
        if not args.keep_logs:
            print("bench: rerun with --keep-logs to keep the server logs", file=sys.stderr)
        return 1
    finally:
        for s in servers:
            terminate(s.process)
        if args.keep_logs:
            print(f"bench: logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    ratios = results.ratios()
    table = format_table(ratios)
    print(table, file=sys.stdout if args.table else sys.stderr, end="", flush=True)
    elapsed = round(time.monotonic() - started, 1)
    print(f"bench: done in {elapsed}s", file=sys.stderr)
    if args.out:
        doc = {
            "setup": results.setup,
            "workload": work.__dict__,
            "results": [r for r in results.records if r["metric"] != "setup"],
            "ratios": ratios,
            "notes": results.notes,
            "elapsed_s": elapsed,
        }
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


def _record_setup(
    servers: list[Server], results: Results, model: str, work: Workload, args: argparse.Namespace
) -> None:
    machine = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    results.setup["machine"] = machine
    results.setup["model"] = model
    for s in servers:
        info: dict[str, Any] = {
            "command": s.command[1:],
            "port": s.port,
            **mapped_blas(s.process.pid),
        }
        if s.name == MLXD:
            health = s.info.get("health", {})
            info |= {
                "backend": health.get("backend"),
                "model": health.get("model"),
                "version": health.get("version"),
            }
        else:
            info |= {k: v for k, v in s.info.items() if k != "health"}
            info["weights"] = describe_weights(s.info["model"])
            info["versions"] = _versions()
            info["defaults"] = REFERENCE_DEFAULTS | {"extra_args": args.reference_arg}
        results.setup[s.name] = info
        results.emit(
            {"server": s.name, "metric": "setup", "value": None, "unit": None, "info": info}
        )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench",
        description="Benchmark mlxd against mlx_lm.server (and in-process mlx-lm) on the same "
        "model and streaming workload. JSON lines on stdout, ratio table on stderr.",
    )
    p.add_argument(
        "--model",
        help=f"model path/spec for both sides (default: the --mlxd-config "
        f"model, else {BUNDLED_MODEL}); GGUF/bundled models are exported for the "
        "reference",
    )
    p.add_argument("--mlxd-config", help="config file for mlxd (default: an empty config)")
    p.add_argument(
        "--no-reference", dest="reference", action="store_false", help="do not start mlx_lm.server"
    )
    p.add_argument(
        "--reference-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for mlx_lm.server (repeatable; default: none)",
    )
    p.add_argument("--mlxd-port", type=int, default=0, help="port for mlxd (default: free)")
    p.add_argument(
        "--reference-port", type=int, default=0, help="port for mlx_lm.server (default: free)"
    )
    p.add_argument("--repeats", type=int, help="repeats per measurement (default 3)")
    p.add_argument("--max-tokens", type=int, help="max_tokens of generation runs (default 200)")
    p.add_argument("--prefill-tokens", type=int, help="approximate prefill prompt size (1000)")
    p.add_argument("--concurrency", type=int, nargs="+", help="concurrency levels (1 4 8)")
    p.add_argument("--turns", type=int, help="conversation turns (default 10)")
    p.add_argument("--turn-max-tokens", type=int, help="max_tokens per turn (default 48)")
    p.add_argument(
        "--skip",
        nargs="+",
        default=[],
        choices=["single", "prefill", "concurrency", "turns", "inprocess"],
        help="suites to leave out",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny run for smoke tests (1 repeat, short prompts, 3 turns, "
        "concurrency 1 and 2, few tokens)",
    )
    p.add_argument("--out", help="also write all results as one JSON document to this file")
    p.add_argument("--table", action="store_true", help="print the ratio table on stdout")
    p.add_argument(
        "--start-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for both servers to be ready",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=900.0,
        help="socket timeout of one request, seconds",
    )
    p.add_argument("--keep-logs", action="store_true", help="keep the temp dir with server logs")
    p.add_argument("--inprocess-worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    return p


def _raise_on_term(signum: int, _frame: Any) -> None:
    # Turn SIGTERM/SIGHUP into an exception so `finally` stops the servers.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.inprocess_worker:
        return inprocess_worker(Path(args.inprocess_worker[0]), Path(args.inprocess_worker[1]))
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_on_term)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("bench: interrupted; servers stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
