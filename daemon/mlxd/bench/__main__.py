"""``python -m mlxd.bench`` (what ``bin/bench`` runs)."""

from .cli import main

raise SystemExit(main())
