"""``/health``, ``/v1/models`` and ``/v1/models/{id}``: every configured model with its state."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from quart import Blueprint, Response, jsonify

from .. import __version__
from ..engine.residency import ModelStatus
from ..errors import NotFound
from . import security
from .context import AppState, state
from .routing import router

bp = Blueprint("models", __name__)


def model_object(model_id: str, created: int, **extra: Any) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "mlxd", **extra}


def _configured(st: AppState) -> list[ModelStatus]:
    """The engine's view of the models the settings in effect configure, in config order
    (a removed model that still finishes its requests is not listed)."""
    ids = router(st.settings).entries
    return [m for m in st.engine.models() if m.id in ids]


def _wire(st: AppState, m: ModelStatus) -> dict[str, Any]:
    entry = router(st.settings).entries[m.id]
    created = m.model.created if m.model is not None else int(st.started_at)
    return model_object(m.id, created, state=m.state, aliases=list(entry.aliases))


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts else None


def health_model(m: ModelStatus, now: float) -> dict[str, Any]:
    """One model as /health (and ``mlxd ps``) shows it."""
    return {
        "id": m.id,
        "state": m.state,
        "default": m.default,
        "pinned": m.pinned,
        "keep_alive": m.keep_alive,
        "memory_bytes": m.memory_bytes,
        "estimate_bytes": m.estimate_bytes,
        "max_batch_size": m.max_batch_size,
        "last_used": _iso(m.last_used),
        "idle_seconds": round(now - m.last_used, 1) if m.last_used else None,
        "loaded_at": _iso(m.loaded_at),
        "load_seconds": round(m.load_seconds, 3) if m.load_seconds is not None else None,
        "active": m.active,
        "queued": m.queued,
        "dtype": m.dtype,
        "context_length": m.context_length,
        "error": m.error,
    }


@bp.get("/health")
async def health() -> Response:
    """200 once the models to preload are loaded; 503 with Retry-After while they load or
    after the default model failed to load."""
    st = state()
    engine = st.engine
    status = engine.status()
    lm = status.model
    now = time.time()
    models = _configured(st)
    body: dict[str, Any] = {
        "status": "ok" if status.state == "ready" else status.state,
        "version": __version__,
        "uptime_seconds": round(now - st.started_at, 1),
        "model": lm.describe() if lm is not None else None,
        "models": [health_model(m, now) for m in models],
        "memory": {"budget_bytes": status.budget_bytes, "used_bytes": status.used_bytes},
        "backend": engine.device,
        "queue_depth": status.queue_depth,
        "active": status.active,
        "prompt_cache": engine.cache_status(),
        "last_reload": st.last_reload,
    }
    if status.load_error:
        body["error"] = status.load_error
    group = engine.group
    broken = group is not None and group.broken
    if group is not None:
        body["distributed"] = group.status.describe()
        if broken:
            body["status"] = "failed"
            body["error"] = group.status.error
    if st.shutting_down:
        body["status"] = "stopping"
    if not security.authenticated(st):  # liveness only for callers without a key
        body = {"status": body["status"]}
    resp = jsonify(body)
    if status.state != "ready" or st.shutting_down or broken:
        resp.status_code = 503
        resp.headers["Retry-After"] = "2" if status.state == "loading" and not broken else "30"
    return resp


@bp.get("/v1/models")
async def list_models() -> Response:
    st = state()
    return jsonify({"object": "list", "data": [_wire(st, m) for m in _configured(st)]})


@bp.get("/v1/models/<path:model_id>")
async def get_model(model_id: str) -> Response:
    st = state()
    for m in _configured(st):
        if m.id == model_id:
            return jsonify(_wire(st, m))
    raise NotFound(
        f"The model {model_id!r} does not exist. Configured models: "
        + ", ".join(router(st.settings).entries)
        + ".",
        param="model",
        code="model_not_found",
    )
