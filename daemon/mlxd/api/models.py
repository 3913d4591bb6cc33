"""``/health``, ``/v1/models`` and ``/v1/models/{id}``."""

from __future__ import annotations

import time
from typing import Any

from quart import Blueprint, Response, jsonify

from .. import __version__
from ..errors import NotFound
from . import security
from .context import state

bp = Blueprint("models", __name__)


def model_object(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "mlxd"}


@bp.get("/health")
async def health() -> Response:
    """200 once a model serves; 503 with Retry-After while loading or after a failed load."""
    st = state()
    engine = st.engine
    lm = engine.current
    body: dict[str, Any] = {
        "status": "ok" if engine.state == "ready" else engine.state,
        "version": __version__,
        "uptime_seconds": round(time.time() - st.started_at, 1),
        "model": lm.describe() if lm is not None else None,
        "backend": engine.device,
        "queue_depth": engine.queue_depth(),
        "active": engine.active_count(),
        "prompt_cache": engine.cache_status(),
        "last_reload": st.last_reload,
    }
    if engine.load_error:
        body["error"] = engine.load_error
    if st.shutting_down:
        body["status"] = "stopping"
    if not security.authenticated(st):  # liveness only for callers without a key
        body = {"status": body["status"]}
    resp = jsonify(body)
    if engine.state != "ready" or st.shutting_down:
        resp.status_code = 503
        resp.headers["Retry-After"] = "2" if engine.state == "loading" else "30"
    return resp


@bp.get("/v1/models")
async def list_models() -> Response:
    lm = state().engine.current
    data = [model_object(lm.id, lm.created)] if lm is not None else []
    return jsonify({"object": "list", "data": data})


@bp.get("/v1/models/<path:model_id>")
async def get_model(model_id: str) -> Response:
    lm = state().engine.current
    if lm is None or model_id != lm.id:
        raise NotFound(
            f"The model '{model_id}' does not exist", param="model", code="model_not_found"
        )
    return jsonify(model_object(lm.id, lm.created))
