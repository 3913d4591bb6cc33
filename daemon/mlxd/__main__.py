"""``python -m mlxd``: the same as the ``mlxd`` command."""

from .cli import main

raise SystemExit(main())
