"""The open-file limit: every connection is a file descriptor, so the daemon needs many.

``mlx_lm.utils`` calls ``setrlimit(RLIMIT_NOFILE, (2048, 4096))`` when it is imported. That
*lowers* the limit a service manager gave the process (the unit files ask for 8192), and an
unprivileged process can never raise its hard limit again: 2,048 idle connections were
enough to make ``/health`` stop answering. So the daemon imports mlx_lm with that one call
suppressed, then raises its soft limit to the hard limit (capped at :data:`MAX_SOFT`).
"""

from __future__ import annotations

import resource
from typing import Any

#: Highest soft limit asked for when the hard limit is unlimited.
MAX_SOFT = 65536
#: Below this many descriptors the daemon warns at start (connections + model files + logs).
LOW_LIMIT = 4096


def import_mlx_lm_keeping_limit() -> None:
    """Import ``mlx_lm.utils`` without letting it change RLIMIT_NOFILE (no-op if imported)."""
    real = resource.setrlimit

    def keep_nofile(which: int, limits: Any) -> None:
        if which != resource.RLIMIT_NOFILE:
            real(which, limits)

    resource.setrlimit = keep_nofile
    try:
        import mlx_lm.utils  # noqa: F401
    finally:
        resource.setrlimit = real


def raise_soft_limit() -> tuple[int, int]:
    """Raise the soft open-file limit as far as the hard limit allows; returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = MAX_SOFT if hard == resource.RLIM_INFINITY else hard
    for target in (want, 10240):  # macOS refuses more than OPEN_MAX (10240) for some
        if target <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            continue
        soft = target
        break
    return soft, hard
