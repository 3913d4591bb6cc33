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

from dataclasses import dataclass
from fnmatch import fnmatchcase

from ..config import ModelSettings, Settings, is_legacy, model_table, table_problems
from ..errors import NotFound
from .names import derived_id, is_glob

__all__ = [
    "Router",
    "derived_id",
    "is_glob",
    "is_legacy",
    "model_table",
    "table_problems",
]


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
