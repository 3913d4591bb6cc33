"""``mlx.launch`` without its busy loop: what the supervisor runs (``python -m
mlxd.quietlaunch ARGS`` takes ``mlx.launch``'s arguments).

``mlx.launch`` (MLX 0.32) forwards its standard input to every rank: each rank's I/O thread
waits in ``select`` with the rank's stdin pipe among the descriptors to write, and a pipe
with room is always writable, so ``select`` returns at once and the thread spins; measured
here: the launcher of two ranks used 50% of a core while the group was idle. A daemon's ranks
read no input, so this module takes the write side out of those ``select`` calls (they then
wait for output or their one-second timeout) and is otherwise ``mlx.launch`` itself. The
supervisor gives it a standard input that never has data, so its main loop waits too. If the
launcher's module has no ``select`` to replace (another MLX), it runs unchanged.
"""

from __future__ import annotations

import sys
from typing import Any


def main() -> int:
    from mlx._distributed_utils import launch

    real = getattr(launch, "select", None)
    if callable(real):

        def select(rlist: Any, wlist: Any, xlist: Any, timeout: float | None = None) -> Any:
            readable, _, errors = real(rlist, [], xlist, timeout)
            return readable, [], errors

        launch.select = select
    sys.argv[0] = "mlx.launch"
    result = launch.main()
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
