"""Slow and abusive clients against the real daemon: idle and half-sent connections never
starve ``/health``, and the daemon keeps the open-file limit it was given."""

from __future__ import annotations

import contextlib
import resource
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Daemon

pytestmark = pytest.mark.e2e

IDLE = 2100


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/<pid>/limits")
def test_daemon_keeps_a_high_open_file_limit(shared_daemon: Daemon) -> None:
    """Importing mlx_lm used to lower the limit to 2048/4096; the daemon now keeps the hard
    limit it inherited and raises its soft limit to it."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    limits = Path(f"/proc/{shared_daemon.process.pid}/limits").read_text()
    line = next(ln for ln in limits.splitlines() if ln.startswith("Max open files"))
    soft_d, hard_d = (int(v) if v.isdigit() else resource.RLIM_INFINITY for v in line.split()[3:5])
    assert hard_d == hard
    assert soft_d >= min(hard, 8192)


def test_health_answers_under_thousands_of_idle_half_sent_connections(
    shared_daemon: Daemon,
) -> None:
    """2,100 connections that sent half a request head and went quiet: /health still answers
    (2,048 of them used to exhaust the daemon's descriptors)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < IDLE + 200:
        if hard != resource.RLIM_INFINITY and hard < IDLE + 200:
            pytest.skip(f"this test process may open only {hard} files")
        resource.setrlimit(resource.RLIMIT_NOFILE, (IDLE + 200, hard))
    idle: list[socket.socket] = []
    try:
        for _ in range(IDLE):
            sock = socket.create_connection(("127.0.0.1", shared_daemon.port), timeout=30)
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            idle.append(sock)
        with shared_daemon.http(timeout=30) as http:
            resp = http.get("/health")
        assert resp.status_code == 200, resp.text
    finally:
        for sock in idle:
            with contextlib.suppress(OSError):
                sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_half_sent_body_gets_408_and_frees_the_connection(
    start_daemon: Callable[..., Daemon],
) -> None:
    """A body shorter than its Content-Length, then silence: 408 after
    server.body_timeout_seconds (the connection used to be held until the client gave up)."""
    d = start_daemon("[server]\nbody_timeout_seconds = 2\n")
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{d.port}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", d.port), timeout=60) as sock:
        sock.sendall(head + b'{"messages": [')
        reply = b""
        while b"\r\n\r\n" not in reply:
            data = sock.recv(65536)
            assert data, f"closed without an answer: {reply!r}"
            reply += data
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
