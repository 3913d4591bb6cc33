"""Who may talk to the daemon: Host allow-list, Origin, content type, API keys, CORS.

* Host: a web page can point its own domain at 127.0.0.1 (DNS rebinding) and then read the
  local API from a browser. The browser still sends the page's domain in ``Host``, so only
  loopback names, the bound address and ``server.allowed_hosts`` are accepted (403 otherwise).
* Origin: a page on another site can still *send* a "simple" request (a ``text/plain`` POST,
  a form) to 127.0.0.1; CORS only hides the answer, while the generation runs and is stored.
  So a request whose ``Origin`` is not allowed by the CORS rules below (``null``,
  ``file://``, ``http://localhost.evil.example`` included) is refused with 403
  ``origin_not_allowed`` before anything runs, whatever its method (Ollama does the same).
* Content type: a POST whose body is not declared JSON (``application/json`` or
  ``*/*+json``) is refused with 415 ``unsupported_media_type``: no browser can send JSON
  cross-site without a preflight, so this closes form and ``text/plain`` CSRF even for
  clients that send no ``Origin``.
* API keys: optional on loopback, required elsewhere (enforced by config validation);
  compared in constant time; CORS preflights stay open. ``/health`` stays open for
  liveness, but when keys are set a caller without one sees only ``status`` (no model
  path, reload errors or queue); ``/metrics`` then needs a key.
* CORS: localhost origins by default; exactly ``server.cors_origins`` when set.
"""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

from quart import Response, request

from ..config import LOOPBACK_NAMES
from ..errors import Forbidden, Unauthorized
from .context import AppState

_OPEN_PATHS = frozenset({"/health"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_CORS_HEADERS = (
    "Authorization, Content-Type, X-Request-ID, OpenAI-Organization, OpenAI-Project, "
    "x-api-key, anthropic-version, anthropic-beta"
)


def _host_name(host_header: str) -> str:
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:8765
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def host_allowed(st: AppState, host_header: str | None) -> bool:
    if not host_header:
        return False
    allowed = {
        *LOOPBACK_NAMES,
        st.settings.server.host.lower(),
        *map(str.lower, st.settings.server.allowed_hosts),
    }
    if "*" in allowed:
        return True
    return _host_name(host_header) in allowed


def origin_allowed(st: AppState, origin: str) -> bool:
    configured = st.settings.server.cors_origins
    if configured:
        return "*" in configured or origin.rstrip("/") in {o.rstrip("/") for o in configured}
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and (parts.hostname or "") in LOOPBACK_NAMES


def _json_declared() -> bool:
    mimetype = request.mimetype or ""
    return mimetype == "application/json" or (
        mimetype.startswith("application/") and mimetype.endswith("+json")
    )


def _presented_key() -> str:
    # Anthropic clients send the key as x-api-key; OpenAI clients as a Bearer token.
    token = request.headers.get("x-api-key", "")
    if not token.strip():
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            token = ""
    return token.strip()


def authenticated(st: AppState) -> bool:
    """True when no keys are configured or the request carries a valid one."""
    return not st.api_keys or _key_ok(st, _presented_key())


def _key_ok(st: AppState, presented: str) -> bool:
    ok = False
    for key in st.api_keys:
        # Compare against every key, so timing says nothing about which one nearly matched.
        ok |= hmac.compare_digest(presented.encode(), key.encode())
    return ok


async def check(st: AppState) -> Response | None:
    """before_request guard: Host, CORS preflight, API key. Raises OpenAI-shaped errors."""
    if not host_allowed(st, request.headers.get("Host")):
        raise Forbidden(
            f"Host {request.headers.get('Host')!r} is not allowed. Hint: add it to "
            "[server] allowed_hosts if you reach mlxd under that name.",
            code="host_not_allowed",
        )
    origin = request.headers.get("Origin")
    if origin is not None and not origin_allowed(st, origin):
        raise Forbidden(
            f"Origin {origin!r} is not allowed. Hint: add it to [server] cors_origins if a "
            "web page there should use mlxd.",
            code="origin_not_allowed",
        )
    if request.method == "OPTIONS":
        return Response("", status=204)
    if request.method in _BODY_METHODS and not _json_declared():
        err = Forbidden(
            f"Content-Type {request.headers.get('Content-Type', '')!r} is not accepted: send "
            "the body as 'Content-Type: application/json'",
            code="unsupported_media_type",
        )
        err.status, err.type = 415, "invalid_request_error"
        raise err
    if request.path in _OPEN_PATHS or not st.api_keys:
        return None
    token = _presented_key()
    if not token:
        raise Unauthorized(
            "missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>' "
            "(see [security] in mlxd.toml)"
        )
    if not _key_ok(st, token):
        raise Unauthorized("incorrect API key provided")
    return None


def add_cors_headers(st: AppState, response: Response) -> None:
    origin = request.headers.get("Origin")
    if not origin or not origin_allowed(st, origin):
        return
    wildcard = "*" in st.settings.server.cors_origins
    response.headers["Access-Control-Allow-Origin"] = "*" if wildcard else origin
    if not wildcard:
        response.headers["Vary"] = "Origin"
    if request.method == "OPTIONS":
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = request.headers.get(
            "Access-Control-Request-Headers", _CORS_HEADERS
        )
        response.headers["Access-Control-Max-Age"] = "600"
    response.headers["Access-Control-Expose-Headers"] = "x-request-id, Retry-After"
