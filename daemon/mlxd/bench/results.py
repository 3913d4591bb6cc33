"""Measurements: one JSON line per (server, metric, parameters), and the ratio table."""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

MLXD = "mlxd"
REFERENCE = "mlx_lm.server"
INPROCESS = "mlx_lm-inprocess"

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


def median_int(values: list[int]) -> int:
    return int(statistics.median(values)) if values else 0
