"""``python -m mlxd.agent`` (what bin/install-agent and bin/uninstall-agent run)."""

from .cli import main

raise SystemExit(main())
