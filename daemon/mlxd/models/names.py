"""Model names without the settings tree: ids derived from paths, globs, alias conflicts.

A leaf (no import of :mod:`mlxd.config`), so the settings' own validation can use it and the
router (:mod:`mlxd.models.registry`) can build on the settings: imports run one way.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from pathlib import Path

_GLOB = re.compile(r"[*?\[]")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_glob(alias: str) -> bool:
    return bool(_GLOB.search(alias))


def derived_id(path: str) -> str:
    """The id a lone ``[model]`` with an empty ``id`` has always served under (no file IO)."""
    if path.lower().startswith("bundled:"):
        return path.split(":", 1)[1].strip()
    if path.lower().endswith(".gguf"):
        return Path(path).stem
    if _REPO_ID.match(path) and not Path(path).expanduser().exists():
        return path
    return Path(path).expanduser().resolve().name or path


def alias_conflicts(aliases: Mapping[str, Sequence[str]]) -> list[str]:
    """Every alias that could reach two entries (``{id: its aliases}``): the same exact name
    twice, a glob matching another entry's id or exact alias, two globs that match each
    other's text."""
    names = {eid: [eid, *(a for a in al if not is_glob(a))] for eid, al in aliases.items()}
    globs = {eid: [a for a in al if is_glob(a)] for eid, al in aliases.items()}
    problems: list[str] = []
    ids = list(aliases)
    for i, a in enumerate(ids):
        for b in ids[i + 1 :]:
            for name in names[a]:
                hits = [n for n in names[b] if n == name]
                hits += [g for g in globs[b] if fnmatchcase(name, g)]
                problems += [_conflict(name, a, b, h) for h in hits]
            for name in names[b]:
                problems += [_conflict(name, b, a, g) for g in globs[a] if fnmatchcase(name, g)]
            for ga in globs[a]:
                problems += [
                    _conflict(ga, a, b, gb)
                    for gb in globs[b]
                    if ga == gb or fnmatchcase(ga, gb) or fnmatchcase(gb, ga)
                ]
    return problems


def _conflict(name: str, owner: str, other: str, pattern: str) -> str:
    return (
        f"models.{other}.aliases: {pattern!r} also matches {name!r} of models.{owner}, so a "
        "request could reach either model. Hint: make the aliases of different models disjoint."
    )
