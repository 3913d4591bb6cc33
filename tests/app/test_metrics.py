"""Prometheus metrics: the Metrics object and the /metrics route in-process."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from conftest import samples, value
from mlxd.api.app import create_app
from mlxd.api.context import AppState, RequestRecord
from mlxd.config import Settings
from mlxd.engine.protocol import EngineStatus
from mlxd.engine.residency import ModelStatus
from mlxd.metrics import Metrics

PARIS = [{"role": "user", "content": "What is the capital of France?"}]


@dataclass
class FakeModel:
    id: str = "fake-model"
    dtype: str = "float32"
    load_seconds: float = 1.5
    created: int = 0

    def describe(self) -> dict[str, Any]:
        return {"id": self.id}


@dataclass
class FakeEngine:
    """What metrics and the read-only routes read from the engine."""

    current: FakeModel | None = field(default_factory=FakeModel)
    state: str = "ready"
    device: dict[str, str] = field(default_factory=lambda: {"device": "cpu", "backend": "cpu"})
    load_error: str | None = None
    depth: int = 3
    active: int = 2
    group: Any = None  # a process group (mlxd.engine.distributed.Group), or none

    def queue_depth(self) -> int:
        return self.depth

    def active_count(self) -> int:
        return self.active

    def cache_status(self) -> dict[str, dict[str, int]]:
        tier = {"hits": 4, "misses": 1, "bytes": 2048, "entries": 2}
        return {"ram": tier, "disk": {**tier, "hits": 1}}

    def models(self) -> tuple[ModelStatus, ...]:
        if self.current is None:
            return (ModelStatus("fake-model", "unloaded", pinned=False, keep_alive=0.0),)
        return (
            ModelStatus(
                "fake-model",
                "loaded",
                pinned=False,
                keep_alive=0.0,
                memory_bytes=1000,
                active=2,
                max_batch_size=8,
            ),
        )

    def status(self) -> EngineStatus:
        return EngineStatus(budget_bytes=5000, used_bytes=1000 if self.current else 0)


def test_observe_request_counts_tokens_and_timings() -> None:
    """A finished generation counts its route/status and tokens and fills both histograms."""
    metrics = Metrics(FakeEngine())  # type: ignore[arg-type]
    rec = RequestRecord(
        "r1",
        "POST",
        "/v1/chat/completions",
        time.perf_counter() - 2.0,
        route="/v1/chat/completions",
        prompt_tokens=12,
        completion_tokens=21,
    )
    rec.first_token_at = rec.started + 0.5
    metrics.observe_request(rec, 200)
    metrics.observe_request(RequestRecord("r2", "GET", "/nope", time.perf_counter()), 404)
    text = metrics.render()[0].decode()
    assert value(text, "mlxd_requests_total", route="/v1/chat/completions", status="200") == 1
    assert value(text, "mlxd_requests_total", route="unmatched", status="404") == 1
    assert value(text, "mlxd_prompt_tokens_total") == 12
    assert value(text, "mlxd_completion_tokens_total") == 21
    assert value(text, "mlxd_time_to_first_token_seconds_count") == 1
    assert value(text, "mlxd_time_to_first_token_seconds_sum") == 0.5
    assert value(text, "mlxd_decode_tokens_per_second_count") == 1
    # 20 tokens after the first, over ~1.5 s
    assert 5 < value(text, "mlxd_decode_tokens_per_second_sum") < 20


def test_engine_gauges_are_read_at_scrape_time() -> None:
    """Queue depth, active sequences, load time and model info come from the engine when
    scraped; with no model loaded the model series are absent and ready is 0."""
    engine = FakeEngine()
    metrics = Metrics(engine)  # type: ignore[arg-type]
    text = metrics.render()[0].decode()
    assert value(text, "mlxd_queue_depth") == 3 and value(text, "mlxd_active_sequences") == 2
    assert value(text, "mlxd_model_load_seconds") == 1.5
    assert value(text, "mlxd_model_ready") == 1
    assert value(text, "mlxd_model_info", model="fake-model", backend="cpu", dtype="float32") == 1
    assert value(text, "mlxd_model_state", model="fake-model", state="loaded") == 1
    assert value(text, "mlxd_model_memory_bytes", model="fake-model") == 1000
    assert value(text, "mlxd_model_active_sequences", model="fake-model") == 2
    assert value(text, "mlxd_model_batch_slots", model="fake-model") == 8
    assert value(text, "mlxd_memory_budget_bytes") == 5000
    engine.current, engine.state, engine.depth = None, "failed", 0
    text = metrics.render()[0].decode()
    assert value(text, "mlxd_queue_depth") == 0 and value(text, "mlxd_model_ready") == 0
    assert not any(name == "mlxd_model_info" for name, _ in samples(text))
    assert value(text, "mlxd_model_state", model="fake-model", state="unloaded") == 1


def test_a_process_group_is_described_per_rank() -> None:
    """A group's size, each rank's memory and which ranks answer; no group, no series."""
    from mlxd.engine.distributed import Group

    assert "mlxd_distributed" not in Metrics(FakeEngine()).render()[0].decode()  # type: ignore[arg-type]
    group = Group(0, "ring", "pipeline", step_timeout=10)
    group.size = group.status.size = 3
    group.status.memory = [300, 200, 100]
    engine = FakeEngine(group=group)
    metrics = Metrics(engine)  # type: ignore[arg-type]
    text = metrics.render()[0].decode()
    assert value(text, "mlxd_distributed_ranks") == 3
    assert [value(text, "mlxd_distributed_rank_up", rank=str(r)) for r in range(3)] == [1, 1, 1]
    assert value(text, "mlxd_distributed_rank_memory_bytes", rank="2") == 100
    assert value(text, "mlxd_distributed_broken") == 0
    group.mark_broken("[ring] connection to a peer was lost")
    text = metrics.render()[0].decode()
    # Rank 0 sees its ring neighbours go: ranks 1 and 2 of 3.
    assert [value(text, "mlxd_distributed_rank_up", rank=str(r)) for r in range(3)] == [1, 0, 0]
    assert value(text, "mlxd_distributed_broken") == 1


def test_prompt_cache_tiers_are_scraped() -> None:
    """Hits and misses per prompt-cache tier and the bytes each holds are read at scrape time."""
    text = Metrics(FakeEngine()).render()[0].decode()  # type: ignore[arg-type]
    assert value(text, "mlxd_prompt_cache_lookups_total", tier="ram", result="hit") == 4
    assert value(text, "mlxd_prompt_cache_lookups_total", tier="disk", result="hit") == 1
    assert value(text, "mlxd_prompt_cache_lookups_total", tier="disk", result="miss") == 1
    assert value(text, "mlxd_prompt_cache_bytes", tier="disk") == 2048
    assert value(text, "mlxd_prompt_cache_entries", tier="ram") == 2


def test_metrics_route_is_open_and_per_app() -> None:
    """/metrics needs no API key, serves the text format, and each app counts on its own
    registry (two apps in one process do not share or clash)."""
    settings = Settings(security={"api_keys": ["secret"]})

    async def scrape(app: Any, calls: int) -> str:
        client = app.test_client()
        for _ in range(calls):
            resp = await client.get("/v1/models", headers={"Authorization": "Bearer secret"})
            assert resp.status_code == 200
        resp = await client.get("/metrics")
        assert resp.status_code == 200
        assert resp.content_type.startswith("text/plain")
        return str(await resp.get_data(as_text=True))

    first = create_app(AppState(settings=settings, engine=FakeEngine()))  # type: ignore[arg-type]
    second = create_app(AppState(settings=settings, engine=FakeEngine()))  # type: ignore[arg-type]
    text_first = asyncio.run(scrape(first, 2))
    text_second = asyncio.run(scrape(second, 1))
    assert value(text_first, "mlxd_requests_total", route="/v1/models", status="200") == 2
    assert value(text_second, "mlxd_requests_total", route="/v1/models", status="200") == 1
