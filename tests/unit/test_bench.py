"""``bin/bench``'s parts that need no server: SSE parsing, ratio pairing, the prefill text.
(tests/e2e/test_bench_e2e.py runs the bench itself.)"""

from __future__ import annotations

import io

from mlxd.bench.client import sse_frames
from mlxd.bench.results import INPROCESS, MLXD, REFERENCE, Results, format_table
from mlxd.bench.workload import prefill_text


class _Lines(io.BytesIO):
    """An in-memory HTTP body: ``sse_frames`` only needs ``readline``."""


def test_sse_parser_skips_comments_and_keeps_event_names() -> None:
    """SSE frames come out as (event, data); keepalive comments and blank lines are skipped."""
    body = b': keepalive\n\nevent: response.created\ndata: {"a": 1}\n\ndata: [DONE]\n\n'
    assert list(sse_frames(_Lines(body))) == [("response.created", '{"a": 1}'), (None, "[DONE]")]


def test_ratios_pair_measurements_with_equal_parameters() -> None:
    """Ratios are mlxd / other for the same metric and parameters; token counts do not split."""
    results = Results(stdout=io.StringIO())
    results.measurement(
        MLXD, "decode_tokens_per_s", "tokens/s", [20.0], max_tokens=8, completion_tokens=8
    )
    results.measurement(
        REFERENCE, "decode_tokens_per_s", "tokens/s", [10.0], max_tokens=8, completion_tokens=7
    )
    results.measurement(INPROCESS, "decode_tokens_per_s", "tokens/s", [25.0], max_tokens=8)
    results.measurement(REFERENCE, "ttft_ms", "ms", [5.0], max_tokens=8)  # no mlxd partner
    rows = results.ratios()
    assert {(r["versus"], r["ratio"]) for r in rows} == {(REFERENCE, 2.0), (INPROCESS, 0.8)}
    assert "2.00x" in format_table(rows)


def test_prefill_text_grows_with_the_target() -> None:
    """The prefill document is deterministic and longer for a larger token target."""
    assert prefill_text(1000) == prefill_text(1000)
    assert len(prefill_text(1000)) > 5 * len(prefill_text(100))
