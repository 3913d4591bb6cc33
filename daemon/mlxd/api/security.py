"""Who may talk to the daemon: Host allow-list, API keys, CORS.

* Host: a web page can point its own domain at 127.0.0.1 (DNS rebinding) and then read the
  local API from a browser. The browser still sends the page's domain in ``Host``, so only
  loopback names, the bound address and ``server.allowed_hosts`` are accepted (403 otherwise).
* API keys: optional on loopback, required elsewhere (enforced by config validation);
  compared in constant time; ``/health`` and CORS preflights stay open.
* CORS: localhost origins by default; exactly ``server.cors_origins`` when set.
"""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

from quart import Response, request

from ..config import LOOPBACK_NAMES
from ..errors import Forbidden, Unauthorized
from .context import AppState

_OPEN_PATHS = frozenset({"/health", "/metrics"})
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
    if request.method == "OPTIONS":
        return Response("", status=204)
    if request.path in _OPEN_PATHS or not st.api_keys:
        return None
    # Anthropic clients send the key as x-api-key; OpenAI clients as a Bearer token.
    token = request.headers.get("x-api-key", "")
    if not token.strip():
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            token = ""
    if not token.strip():
        raise Unauthorized(
            "missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>' "
            "(see [security] in mlxd.toml)"
        )
    if not _key_ok(st, token.strip()):
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
