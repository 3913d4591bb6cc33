"""``mlxd distributed``: the ``mlx.launch`` line that serves the configured model across the
machines of ``[distributed]`` (printed, or run with ``--run``).

Every rank runs the same ``mlxd serve`` with the same config; ``mlx.launch`` starts them
(over ssh for other machines), sets each one's rank and, for the ring backend, the hostfile
of ``ip:port`` addresses. Rank 0 (the first host) serves HTTP; see
:mod:`mlxd.engine.distributed`.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from .config import Settings


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
        argv += ["--hosts", "127.0.0.1", "-n", str(local_ranks or 2)]
    if d.backend == "ring":
        argv += ["--starting-port", str(d.starting_port)]
    # Each rank starts in this directory (the same checkout path on every machine).
    argv += ["--cwd", os.getcwd(), "--", sys.executable, "-m", "mlxd", "serve"]
    if config is not None:
        argv += ["--config", str(config.resolve())]
    return argv


def run(settings: Settings, config: Path | None, *, run: bool, local_ranks: int) -> int:
    argv = command(settings, config, local_ranks)
    if not run:
        print(shlex.join(argv))
        return 0
    sys.stdout.flush()
    os.execv(argv[0], argv)
    return 1  # not reached
