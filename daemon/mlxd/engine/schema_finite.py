"""Does a JSON schema have any finite instance? (A self-recursive ``$ref`` may have none.)

``{"type": "object", "properties": {"next": {"$ref": "#"}}, "required": ["next"]}`` only
admits infinitely deep objects. The grammar engine accepts it and the model can never
finish a valid answer: it stops at ``max_tokens`` with text that is not JSON. Such a schema
is refused up front (400 ``unsupported_schema``).

The check is a least fixpoint over the schema's local ``$ref`` targets: every target starts
as "no finite instance known", and each round re-evaluates them with what the last round
proved, until nothing changes. It errs towards "finite" wherever the schema language is
too rich to judge cheaply (keywords it does not model never make a schema infinite), so a
valid schema is never refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_PRIMITIVES = frozenset({"string", "number", "integer", "boolean", "null"})


def has_finite_instance(schema: Any) -> bool:
    """True unless every instance of ``schema`` would have to be infinitely deep."""
    targets = sorted(_local_refs(schema))
    known = dict.fromkeys(targets, False)
    changed = True
    while changed:
        changed = False
        for ref in targets:
            if not known[ref]:
                node = _resolve(schema, ref)
                if node is _MISSING or _finite(node, known):
                    known[ref] = changed = True
    return _finite(schema, known)


_MISSING = object()


def _finite(node: Any, known: dict[str, bool]) -> bool:
    if isinstance(node, bool):
        return node
    if not isinstance(node, Mapping):
        return True  # not a schema; the compiler reports it
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#") and not known.get(ref, True):
        return False
    if "const" in node or "enum" in node:
        return True  # literal values are finite
    all_of = node.get("allOf")
    if isinstance(all_of, list) and not all(_finite(s, known) for s in all_of):
        return False
    for key in ("anyOf", "oneOf"):
        branches = node.get(key)
        if isinstance(branches, list) and branches and not any(_finite(s, known) for s in branches):
            return False
    types = node.get("type")
    kinds = {types} if isinstance(types, str) else set(types) if isinstance(types, list) else None
    if kinds is None or kinds & _PRIMITIVES:
        return True  # untyped schemas admit non-object values; primitives are finite
    return ("object" in kinds and _object_finite(node, known)) or (
        "array" in kinds and _array_finite(node, known)
    )


def _object_finite(node: Mapping[str, Any], known: dict[str, bool]) -> bool:
    props = node.get("properties")
    props = props if isinstance(props, Mapping) else {}
    required = node.get("required")
    names = required if isinstance(required, list) else []
    return all(_finite(props[name], known) for name in names if name in props)


def _array_finite(node: Mapping[str, Any], known: dict[str, bool]) -> bool:
    min_items = node.get("minItems", 0)
    prefix = node.get("prefixItems")
    prefix = prefix if isinstance(prefix, list) else []
    needed = min_items if isinstance(min_items, int) and not isinstance(min_items, bool) else 0
    if not all(_finite(s, known) for s in prefix[:needed]):
        return False
    if needed > len(prefix):
        return _finite(node.get("items", True), known)
    return True


def _local_refs(schema: Any) -> set[str]:
    found: set[str] = set()
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, Mapping):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#"):
                found.add(ref)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


def _resolve(schema: Any, ref: str) -> Any:
    node = schema
    for token in ref[1:].split("/")[1:] if ref != "#" else []:
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            return _MISSING
    return node
