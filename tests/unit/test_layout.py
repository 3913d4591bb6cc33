"""The package's layout rules that a reader relies on (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "daemon" / "mlxd"
#: Past this many lines a module must say at its top why it is one piece.
LONG_MODULE_LINES = 400


def test_long_modules_say_why_they_are_one_piece() -> None:
    """A module over ~400 lines carries a "One piece:" paragraph in its docstring saying why
    it is not split; every other module is short enough to read at once."""
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if text.count("\n") <= LONG_MODULE_LINES:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        if "One piece:" not in doc:
            missing.append(f"{path.relative_to(PACKAGE)} ({text.count(chr(10))} lines)")
    assert not missing, "long modules without a 'One piece:' reason: " + ", ".join(missing)
