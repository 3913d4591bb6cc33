"""Prometheus metrics, served as text at ``GET /metrics`` (open like ``/health``).

Each app owns its own ``CollectorRegistry`` (never the process-global one), so tests can build
several apps side by side. Request metrics are observed once per request, from the canonical
``request.completed`` record; gauges that describe the engine (queue, active sequences, model)
are read from it at scrape time, so they are never stale.

    mlxd_requests_total{route,status}          counter; route is the URL rule, not the path
    mlxd_prompt_tokens_total                   counter
    mlxd_completion_tokens_total               counter
    mlxd_time_to_first_token_seconds           histogram, request start -> first text delta
    mlxd_decode_tokens_per_second              histogram, per request, after the first token
    mlxd_queue_depth / mlxd_active_sequences   gauges
    mlxd_model_load_seconds                    gauge, load time of the served model
    mlxd_model_info{model,backend,dtype}       gauge = 1 for the served model
    mlxd_model_ready                           gauge, 1 when a model serves
    mlxd_prompt_cache_lookups_total{tier,result}  counter; tier ram|disk, result hit|miss
    mlxd_prompt_cache_bytes{tier}              gauge, bytes held (RAM) or used on disk
    mlxd_prompt_cache_entries{tier}            gauge

Per model (the ``model`` label is the configured id that answered):

    mlxd_model_requests_total{model,status}    counter
    mlxd_model_time_to_first_token_seconds{model}  histogram
    mlxd_model_state{model,state}              gauge = 1 for the model's state
    mlxd_model_memory_bytes{model}             gauge, measured weights of a loaded model
    mlxd_model_active_sequences{model}         gauge
    mlxd_model_batch_slots{model}              gauge, sequences the model decodes together at most
    mlxd_memory_budget_bytes / mlxd_memory_used_bytes   gauges, engine.memory_budget_bytes
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .engine.core import Engine

#: Time to first token: interactive use cares about 0.05-2 s; long prompts on a CPU take longer.
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)
#: Decode speed per request: a 2-core CPU makes ~10-20 tok/s, Apple GPUs 50-500.
TPS_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 35.0, 50.0, 75.0, 100.0, 150.0, 250.0, 500.0, 1000.0)


class _EngineCollector(Collector):
    """Gauges read from the engine at scrape time."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        engine = self.engine
        yield GaugeMetricFamily(
            "mlxd_queue_depth", "Requests waiting for a batch slot.", value=engine.queue_depth()
        )
        yield GaugeMetricFamily(
            "mlxd_active_sequences", "Sequences being decoded now.", value=engine.active_count()
        )
        yield GaugeMetricFamily(
            "mlxd_model_ready",
            "1 when a model is loaded and serving.",
            value=1.0 if engine.state == "ready" else 0.0,
        )
        lm = engine.current
        load = GaugeMetricFamily(
            "mlxd_model_load_seconds", "Seconds it took to load the default model."
        )
        info = GaugeMetricFamily(
            "mlxd_model_info",
            "The loaded models (value is always 1).",
            labels=["model", "backend", "dtype"],
        )
        backend = engine.device.get("backend", "unknown")
        if lm is not None:
            load.add_metric([], lm.load_seconds)
        models = engine.models()
        loaded = [m.model for m in models if m.model is not None and m.state == "loaded"]
        for served in loaded or ([lm] if lm is not None else []):
            info.add_metric([served.id, backend, served.dtype], 1.0)
        yield load
        yield info
        cache = engine.cache_status()
        lookups = CounterMetricFamily(
            "mlxd_prompt_cache_lookups",
            "Prompt-cache lookups per tier (a RAM miss is then looked up on disk).",
            labels=["tier", "result"],
        )
        held = GaugeMetricFamily(
            "mlxd_prompt_cache_bytes",
            "Bytes of KV caches held in RAM, or used on disk.",
            labels=["tier"],
        )
        entries = GaugeMetricFamily(
            "mlxd_prompt_cache_entries", "Prompt-cache entries per tier.", labels=["tier"]
        )
        for tier, values in cache.items():
            lookups.add_metric([tier, "hit"], values["hits"])
            lookups.add_metric([tier, "miss"], values["misses"])
            held.add_metric([tier], values["bytes"])
            entries.add_metric([tier], values["entries"])
        yield lookups
        yield held
        yield entries
        state = GaugeMetricFamily(
            "mlxd_model_state",
            "Each configured model's state (value 1).",
            labels=["model", "state"],
        )
        memory = GaugeMetricFamily(
            "mlxd_model_memory_bytes", "Weights of a loaded model, measured.", labels=["model"]
        )
        active = GaugeMetricFamily(
            "mlxd_model_active_sequences", "Sequences being decoded, per model.", labels=["model"]
        )
        slots = GaugeMetricFamily(
            "mlxd_model_batch_slots",
            "Most sequences a model decodes together (engine.max_batch_size, resolved).",
            labels=["model"],
        )
        for m in models:
            state.add_metric([m.id, m.state], 1.0)
            memory.add_metric([m.id], float(m.memory_bytes))
            active.add_metric([m.id], float(m.active))
            if m.max_batch_size is not None:
                slots.add_metric([m.id], float(m.max_batch_size))
        yield state
        yield memory
        yield active
        yield slots
        yield from _group_metrics(engine)
        status = engine.status()
        yield GaugeMetricFamily(
            "mlxd_memory_budget_bytes",
            "Memory the loaded models may use together.",
            value=float(status.budget_bytes),
        )
        yield GaugeMetricFamily(
            "mlxd_memory_used_bytes",
            "Memory the loaded models are counted at against the budget.",
            value=float(status.used_bytes),
        )


def _group_metrics(engine: Engine) -> Iterator[Metric]:
    """A process group's size and each rank's state (rank 0 is the one answering)."""
    group = engine.group
    if group is None:
        return
    yield GaugeMetricFamily(
        "mlxd_distributed_ranks",
        "Ranks of the process group serving the model.",
        value=float(group.size),
    )
    up = GaugeMetricFamily(
        "mlxd_distributed_rank_up",
        "1 while a rank answers, 0 once the group is broken with it among the lost ranks.",
        labels=["rank"],
    )
    lost = set(group.status.suspects) if group.broken else set()
    for rank in range(group.size):
        up.add_metric([str(rank)], 0.0 if rank in lost else 1.0)
    yield up
    memory = GaugeMetricFamily(
        "mlxd_distributed_rank_memory_bytes",
        "MLX memory of each rank once its shard of the model was loaded.",
        labels=["rank"],
    )
    for rank, used in enumerate(group.status.memory):
        memory.add_metric([str(rank)], float(used))
    yield memory
    yield GaugeMetricFamily(
        "mlxd_distributed_broken",
        "1 once the process group is broken (restart it).",
        value=1.0 if group.broken else 0.0,
    )


class RequestFacts(Protocol):
    """What a finished request tells the metrics (the API's ``RequestRecord``)."""

    route: str
    started: float
    model: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    first_token_at: float | None


class Metrics:
    """The metrics of one app; ``observe_request`` is called by ``RequestRecord.finish``."""

    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "mlxd_requests",
            "HTTP requests by route and final status (499: the client went away).",
            ["route", "status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "mlxd_prompt_tokens", "Prompt tokens processed.", registry=self.registry
        )
        self.completion_tokens = Counter(
            "mlxd_completion_tokens", "Completion tokens generated.", registry=self.registry
        )
        self.ttft = Histogram(
            "mlxd_time_to_first_token_seconds",
            "Seconds from request start to the first generated text.",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.decode_tps = Histogram(
            "mlxd_decode_tokens_per_second",
            "Per-request decode speed: completion tokens after the first, per second.",
            buckets=TPS_BUCKETS,
            registry=self.registry,
        )
        self.model_requests = Counter(
            "mlxd_model_requests",
            "Generation requests by the model that answered and final status.",
            ["model", "status"],
            registry=self.registry,
        )
        self.model_ttft = Histogram(
            "mlxd_model_time_to_first_token_seconds",
            "Seconds from request start to the first generated text, per model (a cold model's "
            "first request includes its load).",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(engine))

    def observe_request(self, record: RequestFacts, status: int) -> None:
        """Count one finished request (a ``RequestRecord``); safe to call from any route."""
        now = time.perf_counter()
        route = record.route or "unmatched"
        self.requests.labels(route=route, status=str(status)).inc()
        if record.model:
            self.model_requests.labels(model=record.model, status=str(status)).inc()
        if record.prompt_tokens:
            self.prompt_tokens.inc(record.prompt_tokens)
        if record.completion_tokens:
            self.completion_tokens.inc(record.completion_tokens)
        first = record.first_token_at
        if first is None:
            return
        self.ttft.observe(max(first - record.started, 0.0))
        if record.model:
            self.model_ttft.labels(model=record.model).observe(max(first - record.started, 0.0))
        decoded = (record.completion_tokens or 0) - 1
        if decoded > 0 and now > first:
            self.decode_tps.observe(decoded / (now - first))

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
