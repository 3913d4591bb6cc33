"""Residency policies: who is evicted for a load, who unloads when idle, whose batch steps next."""

from __future__ import annotations

import time

from mlxd.config import ModelSettings
from mlxd.engine.residency import RoundRobin, Slot, expired, holders, needs_reload, victims
from mlxd.models.memory import MemoryEstimate


class FakeRunner:
    """Stands in for a BatchRunner: only its number of running jobs matters here."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def slot(
    name: str, size: int, *, state: str = "loaded", pinned: bool = False, used: float = 0.0
) -> Slot:
    s = Slot(ModelSettings(id=name, pinned=pinned), estimate=MemoryEstimate(size, 0))
    s.state = state
    s.last_used = used
    return s


def test_fits_without_evicting() -> None:
    a, new = slot("a", 40, used=1), slot("new", 50, state="unloaded")
    assert victims({"a": a, "new": new}, new, budget=100) == []


def test_evicts_least_recently_used_first_until_it_fits() -> None:
    a, b, c = slot("a", 40, used=3), slot("b", 40, used=1), slot("c", 10, used=2)
    new = slot("new", 50, state="unloaded")
    chosen = victims({"a": a, "b": b, "c": c, "new": new}, new, budget=100)
    assert chosen == [b]  # 90 used -> 50 after b, +50 fits


def test_never_evicts_pinned_or_busy_models() -> None:
    pinned = slot("p", 60, pinned=True, used=0)
    busy = slot("b", 30, used=1)
    busy.runner = FakeRunner(1)
    waiting = slot("w", 5, used=2)
    waiting.pending.append(object())
    new = slot("new", 50, state="unloaded")
    slots = {"p": pinned, "b": busy, "w": waiting, "new": new}
    assert victims(slots, new, budget=100) is None
    text = holders(slots, new)
    assert "p (" in text and "pinned" in text and "in use" in text


def test_measured_weights_replace_the_estimate() -> None:
    a = slot("a", 1000)
    a.weights_bytes = 10
    new = slot("new", 50, state="unloaded")
    assert victims({"a": a, "new": new}, new, budget=100) == []


def test_idle_models_past_keep_alive_expire_busy_and_zero_never() -> None:
    now = time.monotonic()
    idle = slot("idle", 1, used=now - 10)
    idle.keep_alive = 3
    forever = slot("forever", 1, used=now - 10_000)  # keep_alive 0
    busy = slot("busy", 1, used=now - 10)
    busy.keep_alive = 3
    busy.runner = FakeRunner(2)
    fresh = slot("fresh", 1, used=now)
    fresh.keep_alive = 3
    slots = {s.id: s for s in (idle, forever, busy, fresh)}
    assert expired(slots, now) == [idle]


def test_round_robin_alternates_between_models_with_work() -> None:
    a, b, c = slot("a", 1), slot("b", 1), slot("c", 1)
    a.runner, b.runner, c.runner = FakeRunner(3), FakeRunner(0), FakeRunner(1)
    slots = {"a": a, "b": b, "c": c}
    rr = RoundRobin()
    assert [rr.pick(slots).id for _ in range(4)] == ["a", "c", "a", "c"]  # type: ignore[union-attr]
    a.runner = FakeRunner(0)
    c.runner = FakeRunner(0)
    assert rr.pick(slots) is None


def test_only_path_dtype_and_context_changes_need_a_reload() -> None:
    base = ModelSettings(id="m")
    assert not needs_reload(base, base.model_copy(update={"temperature": 0.1, "pinned": True}))
    assert needs_reload(base, base.model_copy(update={"dtype": "float32"}))
