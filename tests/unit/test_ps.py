"""``mlxd ps`` rendering of what /health reports."""

from __future__ import annotations

from mlxd.ps import render


def test_ps_shows_the_prompt_cache_tiers() -> None:
    """Below the model table: bytes, budget, hits and misses of each prompt-cache tier."""
    tier = {"hits": 7, "misses": 2, "bytes": 3_000_000, "budget_bytes": 512_000_000}
    text = render([], {}, {"ram": tier, "disk": {**tier, "hits": 1, "bytes": 2_000_000_000}})
    assert "prompt cache: ram 3.0 MB of 512.0 MB, 7 hits / 2 misses" in text
    assert "disk 2.0 GB of 512.0 MB, 1 hits / 2 misses" in text
    assert "prompt cache" not in render([], {})
