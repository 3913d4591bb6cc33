"""Quart app factory: one error boundary, request records, CORS, and the blueprints.

Every error leaves as OpenAI error JSON (``{"error": {message, type, param, code}}``); the
mapping from :mod:`mlxd.errors` lives here and nowhere else. This is the only module that
imports the route modules (see docs/architecture.md).
"""

from __future__ import annotations

import time
import uuid

from quart import Quart, Response, g, request
from werkzeug.exceptions import HTTPException

from ..errors import BadRequest, MlxdError, PayloadTooLarge
from ..logs import get_logger
from ..metrics import Metrics
from . import body, chat, completions, embeddings, messages, models, responses, security
from .context import AppState, RequestRecord, error_response, state

log = get_logger("mlxd.api")


def create_app(app_state: AppState) -> Quart:
    """Build the Quart app around ``app_state`` (settings, engine, store)."""
    app = Quart("mlxd")
    app.extensions["mlxd"] = app_state
    # Streams can run for many minutes: Quart's 60 s RESPONSE_TIMEOUT would cut them silently.
    app.config["RESPONSE_TIMEOUT"] = None
    # Whole-body deadline for Quart's own readers; mlxd.api.body applies
    # server.body_timeout_seconds to the bodies mlxd reads.
    app.config["BODY_TIMEOUT"] = app_state.settings.server.body_timeout_seconds
    # The size limit is enforced by mlxd.api.body, which reads and discards an oversized
    # body before answering 413; Quart's own limit would answer while the client is still
    # sending, and the client would see a broken pipe instead of the 413.
    app.config["MAX_CONTENT_LENGTH"] = None
    if app_state.metrics is None:
        app_state.metrics = Metrics(app_state.engine)
    metrics = app_state.metrics
    for module in (models, chat, completions, embeddings, responses, messages):
        app.register_blueprint(module.bp)

    @app.get("/metrics")
    async def _metrics() -> Response:
        text, content_type = metrics.render()
        return Response(text, content_type=content_type)

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
        body.check_headers()
        server = st.settings.server
        await body.refuse_oversized(server.max_body_bytes, server.body_timeout_seconds)
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

    @app.teardown_request
    async def _abandoned(_exc: BaseException | None) -> None:
        # A client that disconnects cancels the handler: after_request never runs, so the
        # canonical line is written here (499, nginx's "client closed request").
        rec: RequestRecord | None = g.get("mlxd_record")
        if rec is not None and not rec.done and not rec.streaming:
            rec.error = rec.error or "client_disconnected"
            rec.finish(499)

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
