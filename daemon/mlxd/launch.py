"""``mlxd distributed``: the ``mlx.launch`` line that serves the configured model across the
machines of ``[distributed]`` (printed, or run and kept running with ``--run``).

Every rank runs the same ``mlxd serve`` with the same config; ``mlx.launch`` starts them
(over ssh for other machines), sets each one's rank and, for the ring backend, the hostfile
of ``ip:port`` addresses. Rank 0 (the first host) serves HTTP; see
:mod:`mlxd.engine.distributed`.

:func:`supervise` keeps the group running: ``mlx.launch`` ends the whole group when one rank
exits (a lost machine, a crash, or rank 0 asking for a restart after a config edit, exit 75),
so the supervisor starts it again: a second later after a group that ran for a minute or
more (a requested restart), else after a back-off that doubles up to a minute. SIGTERM or
SIGINT ends the group (its process group: ``mlx.launch``, the local ranks, the ssh sessions
of remote ones) and the supervisor; SIGHUP ends the group and starts it again at once with
the config read anew (rank 0 also applies edits by itself: it watches the file). ``mlxd
serve`` is this supervisor when ``[distributed]`` names hosts, so the service files start a
group unchanged.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .config import ConfigError, Settings, loopback_opener
from .sdnotify import sd_notify

#: Restart back-off (seconds): first, and most.
BACKOFF_FIRST, BACKOFF_MOST = 1.0, 60.0
#: A group that ran this long before it ended is restarted after ``BACKOFF_FIRST``.
HEALTHY_RUN_S = 60.0
#: How long a stopping group gets to end after SIGTERM before SIGKILL.
STOP_GRACE_S = 30.0


def command(settings: Settings, config: Path | None, local_ranks: int = 0) -> list[str]:
    """The argv of the ``mlx.launch`` run for ``settings``."""
    d = settings.distributed
    script = Path(sys.executable).with_name("mlx.launch")  # installed with mlx
    argv = [str(script), "--backend", d.backend]
    if d.hostfile:
        hostfile = Path(d.hostfile).expanduser()
        if not hostfile.is_absolute() and config is not None:
            hostfile = config.parent / hostfile
        argv += ["--hostfile", str(hostfile)]
    elif d.hosts and not local_ranks:
        argv += ["--hosts", ",".join(d.hosts)]
    else:
        ranks = local_ranks or 2
        argv += ["--hosts", "127.0.0.1", "-n", str(ranks)]
        # Ranks sharing this machine share its cores: OpenBLAS would start a thread per core
        # in every rank (measured, 2 ranks on 2 cores: 1.5 tok/s against 6.2 with 1 each).
        if "OPENBLAS_NUM_THREADS" not in os.environ:
            threads = max(1, (os.cpu_count() or 1) // ranks)
            argv += ["--env", f"OPENBLAS_NUM_THREADS={threads}"]
    if d.backend == "ring":
        argv += ["--starting-port", str(d.starting_port)]
    # Each rank starts in this directory (the same checkout path on every machine).
    argv += ["--cwd", os.getcwd(), "--", sys.executable, "-m", "mlxd", "serve"]
    if config is not None:
        argv += ["--config", str(config.resolve())]
    return argv


def run(load: Callable[[], tuple[Settings, Path | None]], *, run: bool, local_ranks: int) -> int:
    """``mlxd distributed``: print the line, or (``run``) supervise the group it starts."""
    settings, config = load()
    if not run:
        print(shlex.join(command(settings, config, local_ranks)))
        return 0
    return supervise(load, local_ranks)


#: :func:`supervise`'s answer when the config no longer describes a group.
NOT_A_GROUP = 75


def supervise(
    load: Callable[[], tuple[Settings, Path | None]],
    local_ranks: int = 0,
    keep: Callable[[Settings], bool] = lambda settings: True,
) -> int:
    """Start the group, start it again whenever it ends (or on SIGHUP), until SIGTERM or
    SIGINT (0), or until the config read for a start no longer describes a group (``keep``
    says no: :data:`NOT_A_GROUP`, and ``mlxd serve`` becomes one process)."""
    stopping = restarting = False
    group: subprocess.Popen[bytes] | None = None

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    def restart(signum: int, frame: object) -> None:
        nonlocal restarting
        restarting = True

    handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    handlers[signal.SIGHUP] = signal.signal(signal.SIGHUP, restart)
    backoff = BACKOFF_FIRST
    notify, ready = bool(os.environ.get("NOTIFY_SOCKET")), False
    try:
        while not stopping:
            try:
                settings, config = load()  # each start reads the config anew
            except ConfigError as exc:
                say(f"cannot start the group: {exc}; trying again in {backoff:g}s")
                _sleep(backoff, lambda: stopping)
                backoff = min(backoff * 2, BACKOFF_MOST)
                continue
            if not keep(settings):
                say("the config no longer describes a group; serving as one process")
                return NOT_A_GROUP
            argv = command(settings, config, local_ranks)
            say(f"starting the group: {shlex.join(argv)}")
            if Path(argv[0]).name == "mlx.launch":  # the same launcher, without its busy loop
                argv = [sys.executable, "-m", "mlxd.quietlaunch", *argv[1:]]
            started = time.monotonic()
            # Its own process group: a stop reaches mlx.launch and every local rank at once.
            # A standard input that never has data: the launcher forwards it to the ranks.
            # systemd hears from the supervisor (NotifyAccess=main), not from rank 0.
            env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
            group = subprocess.Popen(argv, start_new_session=True, stdin=subprocess.PIPE, env=env)
            while group.poll() is None and not stopping and not restarting:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    group.wait(0.5)
                if notify and not ready and (ready := _answers(settings)):
                    sd_notify(f"READY=1\nSTATUS=serving through a group ({shlex.join(argv)})")
            if stopping:
                break
            if restarting:  # SIGHUP: the whole group again, the config read anew
                say("SIGHUP: restarting the group")
                end_group(group)
                restarting = False
                backoff = BACKOFF_FIRST
                continue
            ran = time.monotonic() - started
            if ran >= HEALTHY_RUN_S:
                backoff = BACKOFF_FIRST
            say(f"the group ended after {ran:.0f}s; starting it again in {backoff:g}s")
            _sleep(backoff, lambda: stopping)
            backoff = min(backoff * 2, BACKOFF_MOST)
    finally:
        if group is not None and group.poll() is None:
            sd_notify("STOPPING=1")
            end_group(group)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    say("stopped")
    return 0


def _answers(settings: Settings) -> bool:
    """Rank 0's ``/health`` says ok (liveness: no key needed)."""
    try:
        with loopback_opener().open(f"{settings.server.local_url()}/health", timeout=1.0) as resp:
            return int(resp.status) == 200
    except OSError:  # URLError and HTTPError (a 503 while loading) are OSErrors
        return False


def end_group(group: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the group's process group (rank 0 shuts down in order), SIGKILL after
    :data:`STOP_GRACE_S`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        group.wait(STOP_GRACE_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group.pid, signal.SIGKILL)  # ranks that outlived mlx.launch too
    with contextlib.suppress(subprocess.TimeoutExpired):
        group.wait(5)


def say(message: str) -> None:
    print(f"mlxd distributed: {message}", file=sys.stderr, flush=True)


def _sleep(seconds: float, stopped: Callable[[], bool]) -> None:
    end = time.monotonic() + seconds
    while not stopped():
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(0.2, left))
