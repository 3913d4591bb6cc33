"""systemd's notify protocol (``Type=notify``): one datagram to ``$NOTIFY_SOCKET``."""

from __future__ import annotations

import os
import socket

from .logs import get_logger

log = get_logger("mlxd.service")


def sd_notify(message: str) -> None:
    """Tell systemd about our state (Type=notify); a no-op when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("systemd.notify_failed", error=str(exc))
