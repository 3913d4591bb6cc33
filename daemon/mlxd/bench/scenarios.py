"""The suites (scenarios) the bench runs against every started server.

A new scenario is a method of :class:`Bench` plus an entry in :data:`SUITES` (its name is
then accepted by ``--skip``). Servers are interleaved repeat by repeat, so background load
hits both alike, and every request body is the same for both sides. The single-stream and
prefill suites also ask the in-process reference (:class:`~.inprocess.InProcess`) in turn,
and rotate which side goes first each repeat, so a drift of the machine's speed during the
run moves every side alike.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .client import BenchError, HttpStatusError, StreamResult, stream_chat, stream_response
from .harness import Daemon, Server, get_json
from .inprocess import InProcess
from .results import MLXD, Results, median_int
from .workload import FOLLOW_UPS, LONG_PROMPTS, Workload, prefill_text, tagged


@dataclass
class Bench:
    """Runs the suites against the started servers, interleaving them repeat by repeat."""

    servers: list[Server]
    work: Workload
    results: Results
    timeout: float
    inprocess: InProcess | None = None  # asked in turn with the servers (single, prefill)

    def log(self, msg: str) -> None:
        print(f"bench: {msg}", file=sys.stderr, flush=True)

    def warmup(self) -> None:
        # mlx_lm.server loads its model on the first request; both get the same warm-up.
        for s in self.servers:
            for i in range(self.work.warmups):
                msg = [{"role": "user", "content": f"[warmup {i}] Say hello."}]
                stream_chat(s, msg, 4, self.timeout)

    def _in_turn(
        self, messages: Callable[[int], list[dict[str, str]]], max_tokens: int
    ) -> dict[str, list[StreamResult]]:
        """Every side (the servers, then the in-process reference) once per repeat, the one
        that goes first rotating from repeat to repeat."""
        sides: list[Server | InProcess] = [*self.servers]
        if self.inprocess is not None:
            sides.append(self.inprocess)
        runs: dict[str, list[StreamResult]] = {s.name: [] for s in sides}
        for r in range(self.work.repeats):
            msg = messages(r)
            k = r % len(sides)
            for side in sides[k:] + sides[:k]:
                if isinstance(side, InProcess):
                    res = side.generate(msg, max_tokens, self.timeout)
                else:
                    res = stream_chat(side, msg, max_tokens, self.timeout)
                runs[side.name].append(res)
        return runs

    def _paired(self, runs: dict[str, list[StreamResult]], metric: str, value: Any) -> None:
        """mlxd / each other side, repeat by repeat (the two ran back to back): the median
        of these is steadier than the ratio of the two medians on a drifting machine."""
        mine = runs.get(MLXD)
        if not mine:
            return
        for name, theirs in runs.items():
            if name == MLXD:
                continue
            pairs = [(value(a), value(b)) for a, b in zip(mine, theirs, strict=True)]
            self.results.measurement(
                MLXD, metric, "x", [a / b for a, b in pairs if a and b], versus=name
            )

    def single_stream(self) -> None:
        w = self.work
        self.log(f"single stream: max_tokens={w.max_tokens}, {w.repeats} repeats")
        runs = self._in_turn(
            lambda r: [{"role": "user", "content": tagged(f"single {r}", LONG_PROMPTS[0])}],
            w.max_tokens,
        )
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
        self._paired(runs, "paired_decode_ratio", lambda x: x.decode_tokens_per_s)

    def prefill(self) -> None:
        w = self.work
        self.log(f"prefill: ~{w.prefill_tokens}-token prompt, {w.repeats} repeats")
        doc = prefill_text(w.prefill_tokens)
        runs = self._in_turn(
            lambda r: [{"role": "user", "content": tagged(f"prefill {r}", doc)}], 1
        )
        for name, rs in runs.items():
            self.results.measurement(
                name,
                "prefill_tokens_per_s",
                "tokens/s",
                [x.prompt_tokens / x.ttft for x in rs],
                **_stream_params(rs, max_tokens=1),
            )
        self._paired(runs, "paired_prefill_ratio", lambda x: x.prompt_tokens / x.ttft)

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
                    "completion_tokens": median_int(tokens[s.name]),
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

    def turns(self) -> None:
        """The growing conversation: Chat Completions on every side, then Responses on mlxd
        (the first server; mlx_lm.server has no ``/v1/responses``)."""
        self.chat_turns()
        self.responses_turns(self.servers[0])

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

    def restart(self) -> None:
        """Time to first token of a long prompt (``restart_tokens``, ~3,000) cold, then after
        restarting mlxd (served from the prompt cache's disk tier). mlxd only: the others keep
        no cache across a restart. Each repeat uses its own prompt, so every cold run is
        cold."""
        w = self.work
        server = self.servers[0]
        if not isinstance(server, Daemon):
            self.results.skip(server.name, "restart_ttft_ms", "not a daemon this bench started")
            return
        self.log(f"restart: ~{w.restart_tokens}-token prompt, {w.repeats} repeats")
        doc = prefill_text(w.restart_tokens)
        cold: list[StreamResult] = []
        warm: list[StreamResult] = []
        for r in range(w.repeats):
            msg = [{"role": "user", "content": tagged(f"restart {r}", doc)}]
            cold.append(stream_chat(server, msg, 1, self.timeout))
            _wait_disk_written(server, r + 1, self.timeout)
            server = server.restart()
            self.servers[0] = server  # the caller stops what is in its list
            warm.append(stream_chat(server, msg, 1, self.timeout))
        for mode, rs in (("cold", cold), ("after_restart", warm)):
            self.results.measurement(
                server.name,
                "restart_ttft_ms",
                "ms",
                [x.ttft * 1000 for x in rs],
                mode=mode,
                **_stream_params(rs, max_tokens=1),
            )
        self.results.measurement(
            server.name,
            "restart_ttft_ratio",
            "x",
            [a.ttft / b.ttft for a, b in zip(warm, cold, strict=True)],
            goal="<= 0.2",
        )

    def cold_model(self) -> None:
        """First-token time of a cold model (its load included) against a warm one, mlxd only
        (the first server): a request with ``keep_alive: 0`` (warm) lets the model unload as
        soon as it is idle; once /health says unloaded, the next request (cold) loads it."""
        w = self.work
        server = self.servers[0]
        self.log(f"cold model (mlxd only): load + first token vs warm, {w.repeats} repeats")
        cold: list[StreamResult] = []
        warm: list[StreamResult] = []
        for r in range(w.repeats):
            msg = [{"role": "user", "content": tagged(f"cold {r}", LONG_PROMPTS[0])}]
            warm.append(stream_chat(server, msg, 8, self.timeout, keep_alive=0))
            _wait_unloaded(server, self.timeout)
            cold.append(stream_chat(server, msg, 8, self.timeout, keep_alive=-1))
        for metric, rs in (("cold_ttft_ms", cold), ("warm_ttft_ms", warm)):
            self.results.measurement(
                server.name,
                metric,
                "ms",
                [x.ttft * 1000 for x in rs],
                **_stream_params(rs, max_tokens=8),
            )


def _wait_disk_written(server: Server, entries: int, timeout: float) -> None:
    """Disk writes run in the background: wait until the tier holds ``entries`` entries."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, health = get_json(server.port, "/health", headers=server.headers)
        disk = (health.get("prompt_cache") or {}).get("disk") if isinstance(health, dict) else None
        if disk is None:
            raise BenchError(f"{server.name} reports no prompt-cache disk tier in /health")
        if disk.get("entries", 0) >= entries:
            return
        time.sleep(0.2)
    raise BenchError(f"{server.name}: the prompt cache was not written to disk in {timeout}s")


def _wait_unloaded(server: Server, timeout: float) -> None:
    """Poll /health until the default model is unloaded (``keep_alive: 0`` took effect)."""
    import http.client
    import json
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        try:
            conn.request("GET", "/health", headers=server.headers)
            models = json.loads(conn.getresponse().read()).get("models") or []
        finally:
            conn.close()
        if any(m.get("default") and m.get("state") == "unloaded" for m in models):
            return
        time.sleep(0.1)
    raise BenchError(f"{server.name}: the model did not unload within {timeout}s")


def _stream_params(rs: list[StreamResult], **extra: Any) -> dict[str, Any]:
    cached = [x.cached_tokens for x in rs if x.cached_tokens is not None]
    params = {
        **extra,
        "prompt_tokens": median_int([x.prompt_tokens for x in rs]),
        "completion_tokens": median_int([x.completion_tokens for x in rs]),
    }
    if cached:
        params["cached_tokens"] = median_int(cached)
    return params


#: The suites in the order they run; ``--skip NAME`` leaves one out.
SUITES: dict[str, Callable[[Bench], None]] = {
    "single": Bench.single_stream,
    "prefill": Bench.prefill,
    "concurrency": Bench.concurrency,
    "turns": Bench.turns,
    "restart": Bench.restart,
    "cold": Bench.cold_model,
}
