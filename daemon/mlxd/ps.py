"""``mlxd ps``: the daemon's models with their state, memory and idle time, like ``ollama ps``.

Reads ``GET /health`` (open without an API key) from the daemon the config points at.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from .config import Settings, loopback_opener


def run(settings: Settings, *, as_json: bool = False) -> int:
    """Print the table; exit 1 when the daemon cannot be reached."""
    import urllib.error
    import urllib.request

    url = f"{settings.server.local_url()}/health"
    keys = settings.api_keys()  # /health shows details to authenticated callers only
    headers = {"Authorization": f"Bearer {keys[0]}"} if keys else {}
    try:
        try:
            request = urllib.request.Request(url, headers=headers)
            with loopback_opener().open(request, timeout=5.0) as r:
                raw = r.read()
        except urllib.error.HTTPError as exc:  # 503 while loading: the body still tells
            raw = exc.read()
        body = json.loads(raw)
    except (OSError, ValueError) as exc:
        print(f"mlxd: cannot reach the daemon at {url}: {exc}", file=sys.stderr)
        return 1
    models: list[dict[str, Any]] = body.get("models") or []
    if as_json:
        print(json.dumps(models, indent=2))
        return 0
    print(render(models, body.get("memory") or {}, body.get("prompt_cache") or {}))
    return 0


def render(
    models: list[dict[str, Any]],
    memory: dict[str, Any],
    prompt_cache: dict[str, Any] | None = None,
) -> str:
    """The table: one row per configured model, loaded ones first."""
    rows = [("NAME", "STATE", "MEMORY", "IDLE", "UNTIL UNLOAD", "ACTIVE", "FLAGS")]
    order = {"loaded": 0, "loading": 1, "failed": 2, "unloaded": 3}
    for m in sorted(models, key=lambda m: (order.get(m.get("state", ""), 9), m.get("id", ""))):
        idle = m.get("idle_seconds")
        keep = float(m.get("keep_alive") or 0)
        if m.get("state") != "loaded":
            until = "-"
        elif keep == 0:
            until = "never"
        else:
            until = _duration(max(keep - float(idle or 0), 0.0))
        flags = ",".join(f for f in ("pinned", "default") if m.get(f))
        work = str(int(m.get("active", 0)) + int(m.get("queued", 0)))
        if m.get("max_batch_size"):  # requests against the batch slots: 10/8 is 2 waiting
            work += f"/{m['max_batch_size']}"
        rows.append(
            (
                str(m.get("id", "")),
                str(m.get("state", "")),
                _size(m.get("memory_bytes")) if m.get("state") == "loaded" else "-",
                _duration(idle) if idle is not None and m.get("state") == "loaded" else "-",
                until,
                work,
                flags or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]
    if memory:
        used, limit = memory.get("used_bytes"), memory.get("budget_bytes")
        lines.append(f"\nmemory: {_size(used)} of {_size(limit)} budget")
    tiers = [
        f"{name} {_size(t.get('bytes'))} of {_size(t.get('budget_bytes'))}, "
        f"{t.get('hits', 0)} hits / {t.get('misses', 0)} misses"
        for name, t in (prompt_cache or {}).items()
        if isinstance(t, dict)
    ]
    if tiers:
        lines.append("prompt cache: " + "; ".join(tiers))
    return "\n".join(lines)


def _size(n: Any) -> str:
    if not isinstance(n, int | float):
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
