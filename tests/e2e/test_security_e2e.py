"""Exposure: Host allow-list, CORS, API keys and the non-loopback bind guard, on the real daemon.

The default daemon (``shared_daemon``) must be safe on localhost with no configuration: only
loopback ``Host`` names, only localhost browser origins. A second daemon configured with API
keys, an extra host name and one CORS origin checks that configuration replaces the defaults
exactly and that keys never reach the log.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest

from conftest import (
    Daemon,
    assert_openai_error,
    run_mlxd,
    running_daemon,
    spawn_daemon,
)

pytestmark = pytest.mark.e2e

MSG = [{"role": "user", "content": "Say hi."}]
CONFIG_KEY = "sk-config-7f3a9c1e5b2d4f60a8e1"
FILE_KEY = "sk-file-0b9d8e7c6a5f4e3d2c1b"
WRONG_KEY = "sk-wrong-1122334455667788aabb"
ALLOWED_ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon with two API keys (config list + key file), one extra host and one origin."""
    tmp = tmp_path_factory.mktemp("keyed")
    key_file = tmp / "keys.txt"
    key_file.write_text(f"# mlxd keys\n\n  {FILE_KEY}  \n")
    config = (
        "[server]\n"
        'allowed_hosts = ["mlxd.test"]\n'
        f'cors_origins = ["{ALLOWED_ORIGIN}"]\n'
        "[security]\n"
        f'api_keys = ["{CONFIG_KEY}"]\n'
        f'api_key_file = "{key_file}"\n'
    )
    with running_daemon(tmp, config) as d:
        yield d


# -- Host allow-list (DNS rebinding) ---------------------------------------------------------
@pytest.mark.parametrize(
    "host", ["evil.example", "localhost.evil.example", "127.0.0.1.nip.io", "evil.example:8765"]
)
def test_foreign_host_header_is_403(http: httpx.Client, host: str) -> None:
    """A request whose Host is not a loopback name is refused with an OpenAI-shaped 403."""
    resp = http.post("/v1/chat/completions", json={"messages": MSG}, headers={"Host": host})
    err = assert_openai_error(resp, 403)
    assert err["type"] == "permission_error"
    assert err["code"] == "host_not_allowed"
    assert "allowed_hosts" in err["message"]


def test_foreign_host_is_refused_even_for_health(http: httpx.Client) -> None:
    """The Host check runs before everything, open paths included (a rebinding page learns
    nothing)."""
    assert_openai_error(http.get("/health", headers={"Host": "evil.example"}), 403)


@pytest.mark.parametrize("name", ["localhost", "127.0.0.1", "[::1]", "LOCALHOST"])
def test_loopback_host_names_are_accepted(shared_daemon: Daemon, name: str) -> None:
    """localhost, 127.0.0.1 and [::1] (with the port, any case) are accepted by default."""
    with shared_daemon.http() as http:
        resp = http.get("/v1/models", headers={"Host": f"{name}:{shared_daemon.port}"})
    assert resp.status_code == 200, resp.text


def test_request_without_host_header_is_403(shared_daemon: Daemon) -> None:
    """An HTTP/1.0 request without any Host header is refused, not served."""
    with socket.create_connection(("127.0.0.1", shared_daemon.port), timeout=10) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status_line = data.split(b"\r\n", 1)[0]
    assert b" 403 " in status_line or b" 400 " in status_line, data[:300]


def test_default_bind_is_loopback(shared_daemon: Daemon) -> None:
    """With no host configured the daemon binds 127.0.0.1 (logged at start)."""
    starting = [e for e in shared_daemon.log_events() if e.get("event") == "server.starting"]
    assert starting and starting[0]["host"] == "127.0.0.1"


# -- CORS ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "origin",
    ["http://localhost:3000", "http://127.0.0.1:5173", "https://localhost", "http://[::1]:8080"],
)
def test_localhost_origins_get_cors_by_default(http: httpx.Client, origin: str) -> None:
    """By default any http(s) origin on a loopback name gets CORS for exactly that origin."""
    resp = http.get("/v1/models", headers={"Origin": origin})
    assert resp.status_code == 200
    assert resp.headers["access-control-allow-origin"] == origin
    assert "origin" in resp.headers.get("vary", "").lower()


@pytest.mark.parametrize(
    "origin",
    ["https://evil.example", "http://localhost.evil.example", "null", "file://", "ftp://localhost"],
)
def test_foreign_origins_get_no_cors(http: httpx.Client, origin: str) -> None:
    """A foreign origin gets no Access-Control-Allow-Origin, on requests and on preflights."""
    resp = http.get("/v1/models", headers={"Origin": origin})
    assert "access-control-allow-origin" not in resp.headers
    pre = http.options(
        "/v1/chat/completions",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert pre.status_code < 500
    assert not any(h.startswith("access-control-allow") for h in pre.headers)


def test_preflight_for_localhost_origin(http: httpx.Client) -> None:
    """A preflight from an allowed origin is answered 204 with the methods and headers asked."""
    resp = http.options(
        "/v1/chat/completions",
        headers={
            "Origin": "http://localhost:3000",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert resp.status_code == 204
    assert resp.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "POST" in resp.headers["access-control-allow-methods"]
    assert "authorization" in resp.headers["access-control-allow-headers"].lower()


def test_configured_origins_replace_the_defaults(keyed: Daemon) -> None:
    """With cors_origins set, exactly those origins are granted; localhost ones no longer are."""
    with keyed.http() as http:
        auth = {"Authorization": f"Bearer {CONFIG_KEY}"}
        ok = http.get("/v1/models", headers={**auth, "Origin": ALLOWED_ORIGIN})
        assert ok.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
        local = http.get("/v1/models", headers={**auth, "Origin": "http://localhost:3000"})
        assert "access-control-allow-origin" not in local.headers
        pre = http.options(
            "/v1/models",
            headers={"Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "GET"},
        )
        assert pre.status_code == 204
        assert pre.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
        bad = http.options(
            "/v1/models",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
        )
        assert "access-control-allow-origin" not in bad.headers


# -- API keys --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": f"Bearer {WRONG_KEY}"},
        {"Authorization": f"Bearer {CONFIG_KEY[:-1]}"},
        {"Authorization": f"Bearer {CONFIG_KEY}x"},
        {"Authorization": f"Basic {CONFIG_KEY}"},
        {"Authorization": CONFIG_KEY},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer sk-\u00fcn\u00efc\u00f8d\u00e9".encode()},  # raw UTF-8 bytes
    ],
)
def test_missing_or_wrong_key_is_401(keyed: Daemon, headers: dict[str, Any]) -> None:
    """Without a valid Bearer key every API route answers an OpenAI-shaped 401."""
    with keyed.http() as http:
        for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions")]:
            resp = http.request(method, path, json={"messages": MSG}, headers=headers)
            err = assert_openai_error(resp, 401)
            assert err["type"] == "authentication_error"
            assert err["code"] == "invalid_api_key"


def test_sdk_with_wrong_key_raises_authentication_error(keyed: Daemon) -> None:
    """The OpenAI SDK maps the 401 to AuthenticationError."""
    with pytest.raises(openai.AuthenticationError):
        keyed.client(api_key=WRONG_KEY).models.list()


@pytest.mark.parametrize("key", [CONFIG_KEY, FILE_KEY])
def test_configured_keys_work(keyed: Daemon, key: str) -> None:
    """Keys from api_keys and from api_key_file (comments and blanks skipped) are accepted."""
    resp = keyed.client(api_key=key).chat.completions.create(
        model="m",
        messages=MSG,
        max_tokens=3,  # type: ignore[arg-type]
    )
    assert resp.choices[0].message.content is not None


def test_health_stays_open_with_keys(keyed: Daemon) -> None:
    """/health answers without a key (for service managers and load balancers)."""
    with keyed.http() as http:
        assert http.get("/health").status_code == 200


def test_configured_host_is_accepted_and_others_refused(keyed: Daemon) -> None:
    """allowed_hosts adds names; a foreign Host is 403 even with a valid key."""
    with keyed.http() as http:
        auth = {"Authorization": f"Bearer {CONFIG_KEY}"}
        ok = http.get("/v1/models", headers={**auth, "Host": f"mlxd.test:{keyed.port}"})
        assert ok.status_code == 200
        assert_openai_error(http.get("/v1/models", headers={**auth, "Host": "evil.example"}), 403)


def test_keys_never_reach_the_log(keyed: Daemon) -> None:
    """After requests with right and wrong keys, neither the log file nor stderr holds a key."""
    with keyed.http() as http:
        for key in (CONFIG_KEY, FILE_KEY, WRONG_KEY):
            http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
            http.post(
                "/v1/chat/completions",
                json={"messages": MSG, "max_tokens": 2},
                headers={"Authorization": f"Bearer {key}"},
            )
    log_text = keyed.log_path.read_text()
    assert "request.completed" in log_text
    for secret in (CONFIG_KEY, FILE_KEY, WRONG_KEY):
        assert secret not in log_text
        assert secret not in keyed.stderr_tail(10**7)


# -- binding beyond loopback -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "env"),
    [
        ('[server]\nhost = "0.0.0.0"\n', {}),
        ('[server]\nhost = "::"\n', {}),
        ("", {"MLXD_SERVER__HOST": "192.168.1.10"}),
    ],
)
def test_public_bind_without_key_exits_78(tmp_path: Path, config: str, env: dict[str, str]) -> None:
    """A non-loopback host with no API key refuses to start: exit 78 and a message with the fix."""
    d = spawn_daemon(tmp_path, config, env=env)
    try:
        code = d.process.wait(60)
    finally:
        if d.process.poll() is None:
            d.process.kill()
    assert code == 78
    err = d.stderr_tail()
    assert "not a loopback address" in err
    assert "api_keys" in err and "127.0.0.1" in err


def test_check_config_reports_public_bind_without_key(tmp_path: Path) -> None:
    """`mlxd check-config` finds the same problem before any service is started."""
    cfg = tmp_path / "mlxd.toml"
    cfg.write_text('[server]\nhost = "0.0.0.0"\n')
    out = run_mlxd("--config", str(cfg), "check-config")
    assert out.returncode == 78
    assert "server.host" in out.stderr
