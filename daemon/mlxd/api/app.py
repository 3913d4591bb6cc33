"""Quart app factory: one error boundary, request logging, CORS, and the blueprints.

Every error leaves as OpenAI error JSON (``{"error": {message, type, param, code}}``); the
mapping from :mod:`mlxd.errors` lives here and nowhere else. Each request produces exactly one
``request.completed`` log event (for streams: when the stream ends), with id, method, path,
status, duration, model and token counts; bodies and keys are never logged.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quart import Quart, Response, current_app, g, request
from werkzeug.exceptions import HTTPException

from ..config import Settings
from ..engine.core import Engine
from ..errors import BadRequest, MlxdError, PayloadTooLarge
from ..logs import get_logger
from . import security

log = get_logger("mlxd.api")


@dataclass
class AppState:
    """What routes need; ``settings`` is swapped whole on reload (frozen tree)."""

    settings: Settings
    engine: Engine
    config_path: Path | None = None
    started_at: float = field(default_factory=time.time)
    last_reload: dict[str, Any] | None = None
    store: Any = None
    metrics: Any = None
    api_keys: list[str] = field(default_factory=list)
    shutting_down: bool = False


def state() -> AppState:
    st: AppState = current_app.extensions["mlxd"]
    return st


@dataclass
class RequestRecord:
    """Fields of the canonical ``request.completed`` line, filled in as the request goes."""

    request_id: str
    method: str
    path: str
    started: float
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    streaming: bool = False
    error: str | None = None
    done: bool = False
    route: str = ""  # the URL rule (bounded, unlike path), for metrics
    first_token_at: float | None = None  # perf_counter at the first generated text
    metrics: Any = None  # the app's Metrics; finish() may run outside the request context

    def finish(self, status: int) -> None:
        if self.done:
            return
        self.done = True
        fields = {
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "status": status,
            "duration_ms": round((time.perf_counter() - self.started) * 1000, 1),
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }
        if self.cached_tokens:
            fields["cached_tokens"] = self.cached_tokens
        if self.streaming:
            fields["stream"] = True
        if self.error:
            fields["error"] = self.error
        level = "warning" if status >= 500 else "info"
        getattr(log, level)("request.completed", **fields)
        if self.metrics is not None:
            self.metrics.observe_request(self, status)


def record() -> RequestRecord:
    rec: RequestRecord = g.mlxd_record
    return rec


def error_response(exc: MlxdError) -> Response:
    resp = Response(json.dumps(exc.body()), status=exc.status, mimetype="application/json")
    if exc.retry_after is not None:
        resp.headers["Retry-After"] = str(exc.retry_after)
    return resp


def create_app(app_state: AppState) -> Quart:
    """Build the Quart app around ``app_state`` (settings, engine, store)."""
    app = Quart("mlxd")
    app.extensions["mlxd"] = app_state
    # Streams can run for many minutes: Quart's 60 s RESPONSE_TIMEOUT would cut them silently.
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["BODY_TIMEOUT"] = 120
    app.config["MAX_CONTENT_LENGTH"] = app_state.settings.server.max_body_bytes
    if app_state.metrics is None:
        from ..metrics import Metrics

        app_state.metrics = Metrics(app_state.engine)

    from .chat import bp as chat_bp
    from .models import bp as models_bp
    from .responses import bp as responses_bp

    app.register_blueprint(models_bp)
    app.register_blueprint(chat_bp)
    app.register_blueprint(responses_bp)

    @app.get("/metrics")
    async def _metrics() -> Response:
        body, content_type = state().metrics.render()
        return Response(body, content_type=content_type)

    @app.before_request
    async def _begin() -> Response | None:
        rid = request.headers.get("X-Request-ID", "")
        if not rid or len(rid) > 128 or not rid.isprintable():
            rid = f"req_{uuid.uuid4().hex[:24]}"
        st = state()
        g.mlxd_record = RequestRecord(
            rid,
            request.method,
            request.path,
            time.perf_counter(),
            route=request.url_rule.rule if request.url_rule is not None else "",
            metrics=st.metrics,
        )
        app.config["MAX_CONTENT_LENGTH"] = st.settings.server.max_body_bytes
        length = request.content_length
        if length is not None and length > st.settings.server.max_body_bytes:
            raise PayloadTooLarge(
                f"request body of {length} bytes exceeds server.max_body_bytes "
                f"({st.settings.server.max_body_bytes})"
            )
        return await security.check(st)

    @app.after_request
    async def _end(response: Response) -> Response:
        rec: RequestRecord | None = g.get("mlxd_record")
        if rec is not None:
            response.headers["x-request-id"] = rec.request_id
        security.add_cors_headers(state(), response)
        # Answered before the body arrived (401, 403, 413, 404): hypercorn then closes the
        # connection without saying so and a client reusing it sees "server disconnected".
        # Saying "Connection: close" makes the client open a fresh connection instead.
        body_done = getattr(request.body, "_complete", None)
        if body_done is not None and not body_done.is_set():
            response.headers["Connection"] = "close"
        if rec is not None and not rec.streaming:
            rec.finish(response.status_code)
        return response

    @app.errorhandler(MlxdError)
    async def _mlxd_error(exc: MlxdError) -> Response:
        rec: RequestRecord | None = g.get("mlxd_record")
        if rec is not None:
            rec.error = exc.code or exc.type
        return error_response(exc)

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        if status == 413:
            limit = state().settings.server.max_body_bytes
            err: MlxdError = PayloadTooLarge(
                f"request body exceeds server.max_body_bytes ({limit})"
            )
        elif status == 404:
            err = MlxdError(f"no route for {request.method} {request.path}", code="not_found")
            err.status, err.type = 404, "not_found_error"
        elif status == 405:
            err = BadRequest(f"method {request.method} is not allowed on {request.path}")
            err.status, err.code = 405, "method_not_allowed"
        else:
            err = BadRequest(exc.description or exc.name)
            err.status = status
        return await _mlxd_error(err)

    @app.errorhandler(Exception)
    async def _unexpected(exc: Exception) -> Response:
        log.exception("request.failed", error=f"{type(exc).__name__}: {exc}")
        err = MlxdError(f"internal error: {type(exc).__name__}", code="internal_error")
        return await _mlxd_error(err)

    return app


async def json_body() -> dict[str, Any]:
    """The request's JSON object, or a 400 that says what is wrong with it."""
    raw = await request.get_data(as_text=False)
    if not raw:
        raise BadRequest("the request body is empty; send a JSON object")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:  # [[[[... thousands deep: json's parser recurses per level
        raise BadRequest("the request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    return data
