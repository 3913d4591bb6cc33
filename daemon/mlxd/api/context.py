"""What every route reads: the typed app state, the request's record, and its JSON body.

This is the leaf of the API package: routes, the generation pipeline and the security checks
import it; it imports nothing from them. ``app.py`` is the only module that wires blueprints.

Each request produces exactly one ``request.completed`` log event (for streams: when the
stream ends), with id, method, path, status, duration, model and token counts; bodies and
keys are never logged.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quart import Response, current_app, g, request

from ..config import Settings
from ..conversations.store import Store
from ..engine.core import Engine
from ..errors import BadRequest, MlxdError, ModelUnavailable
from ..logs import get_logger
from ..metrics import Metrics
from . import body

log = get_logger("mlxd.api")


@dataclass
class AppState:
    """What routes need; ``settings`` is swapped whole on reload (frozen tree)."""

    settings: Settings
    engine: Engine
    config_path: Path | None = None
    started_at: float = field(default_factory=time.time)
    last_reload: dict[str, Any] | None = None
    store: Store | None = None
    metrics: Metrics | None = None
    api_keys: list[str] = field(default_factory=list)
    shutting_down: bool = False

    def require_store(self) -> Store:
        """The conversation store, or a 503 while it is not open yet."""
        if self.store is None:
            raise ModelUnavailable("the conversation store is not open yet; retry", retry_after=1)
        return self.store


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
    metrics: Metrics | None = None  # the app's; finish() may run outside the request context

    def finish(self, status: int) -> None:
        if self.done:
            return
        self.done = True
        fields: dict[str, Any] = {
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


#: Routes under this prefix speak Anthropic's Messages API, errors included.
ANTHROPIC_PREFIX = "/v1/messages"


def error_response(exc: MlxdError) -> Response:
    """The error in the shape of the API the request was for (OpenAI unless Anthropic's)."""
    if request.path == ANTHROPIC_PREFIX or request.path.startswith(ANTHROPIC_PREFIX + "/"):
        status, body = exc.anthropic()
        resp = Response(json.dumps(body), status=status, mimetype="application/json")
    else:
        resp = Response(json.dumps(exc.body()), status=exc.status, mimetype="application/json")
    if exc.retry_after is not None:
        resp.headers["Retry-After"] = str(exc.retry_after)
    return resp


async def json_body() -> dict[str, Any]:
    """The request's JSON object, or a 400 that says what is wrong with it (see mlxd.api.body
    for the limits on size, nesting and text)."""
    server = state().settings.server
    raw = await body.read_limited(server.max_body_bytes, server.body_timeout_seconds)
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
    body.check_body(data)
    return data
