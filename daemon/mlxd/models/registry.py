"""The model table and name routing: which configured entry answers a request's ``model``.

Two config shapes give one table (id -> :class:`~mlxd.config.ModelSettings`, ``id`` filled):

* ``[models.<id>]`` tables, one per model; the table name is the id clients send;
* a lone ``[model]`` section (the shape before several models existed): a one-entry table
  whose id is ``[model] id`` or derived from the path, as it always was.

A name is resolved in this order: an entry's id, an exact alias, a glob alias (``gpt-5*``),
``[routing] fallback``; a missing or empty name goes to ``[routing] default`` (else the first
entry). With a lone ``[model]`` every name reaches that model, because clients configured for
the old single-model daemon send whatever name they like. Anything else is a 404
``model_not_found`` listing the ids. Validation refuses names that two entries could claim,
so the order above never has to break a tie.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import NotFound

if TYPE_CHECKING:
    from ..config import ModelSettings, Settings

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


def is_legacy(settings: Settings) -> bool:
    """True when the config uses the single ``[model]`` section (or no model config at all)."""
    return not settings.models


def model_table(settings: Settings) -> dict[str, ModelSettings]:
    """The effective table, in file order, each entry's ``id`` set to its table name."""
    if settings.models:
        return {key: entry.model_copy(update={"id": key}) for key, entry in settings.models.items()}
    entry = settings.model
    entry_id = entry.id or derived_id(entry.path)
    return {entry_id: entry.model_copy(update={"id": entry_id})}


def table_problems(settings: Settings) -> list[str]:
    """What makes the table unusable, one message per problem with its key path and a hint."""
    problems: list[str] = []
    if settings.models and "model" in settings.model_fields_set:
        problems.append(
            "[model] and [models.<id>] are both given. Hint: move the [model] keys into a "
            "[models.<id>] table (the table name becomes the id) and delete [model]."
        )
    for key, entry in settings.models.items():
        if not key.strip() or is_glob(key) or key != key.strip():
            problems.append(
                f"models.{key!r}: an id must be a plain name (no spaces at the ends, no * ? [)."
            )
        if entry.id and entry.id != key:
            problems.append(
                f"models.{key}.id = {entry.id!r}: the table name is the id. Hint: remove id, or "
                f"rename the table to [models.{entry.id}]."
            )
    table = model_table(settings)
    for name in ("default", "fallback"):
        value = getattr(settings.routing, name)
        if value and value not in table:
            problems.append(
                f"routing.{name} = {value!r} names no configured model. Hint: use one of: "
                + ", ".join(table)
                + "."
            )
    problems += _alias_conflicts(table)
    return problems


def _alias_conflicts(table: dict[str, ModelSettings]) -> list[str]:
    """Every alias that could reach two entries: the same exact name twice, a glob matching
    another entry's id or exact alias, two globs that match each other's text."""
    names = {eid: [eid, *(a for a in e.aliases if not is_glob(a))] for eid, e in table.items()}
    globs = {eid: [a for a in e.aliases if is_glob(a)] for eid, e in table.items()}
    problems: list[str] = []
    ids = list(table)
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


@dataclass(frozen=True)
class Router:
    """Name -> entry for one settings tree (rebuilt on reload, never mutated)."""

    entries: dict[str, ModelSettings]
    default_id: str
    fallback_id: str | None

    @classmethod
    def from_settings(cls, settings: Settings) -> Router:
        table = model_table(settings)
        default = settings.routing.default or next(iter(table))
        fallback = settings.routing.fallback or (default if is_legacy(settings) else None)
        return cls(table, default, fallback)

    def resolve(self, name: str | None) -> ModelSettings:
        """The entry that answers ``name``; 404 ``model_not_found`` (listing the ids) if none."""
        if not name:
            return self.entries[self.default_id]
        found = self.entries.get(name)
        if found is not None:
            return found
        for entry in self.entries.values():
            if name in entry.aliases:
                return entry
        for entry in self.entries.values():
            if any(is_glob(a) and fnmatchcase(name, a) for a in entry.aliases):
                return entry
        if self.fallback_id is not None:
            return self.entries[self.fallback_id]
        raise NotFound(
            f"The model {name!r} does not exist. Configured models: "
            + ", ".join(self.entries)
            + ".",
            param="model",
            code="model_not_found",
        )
