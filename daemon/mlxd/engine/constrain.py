"""Grammar-constrained decoding: JSON schema, ``json_object`` and tool-call arguments.

Built on `llguidance <https://github.com/guidance-ai/llguidance>`_ (Rust, abi3 wheels for
macOS arm64 and Linux x86-64/aarch64, no Python dependencies, no torch). It was chosen over
xgrammar (hard ``torch`` + ``triton`` dependency; silently ignores ``allOf``, ``not``,
``if``/``then``/``else``, ``uniqueItems``, ``contains``, ``dependentRequired`` and remote
``$ref``) and outlines-core (regex/DFA index: ~8 s to compile plain ``{"type": "object"}``
on a 49k vocabulary; silently ignores ``minimum``/``maximum``, ``multipleOf``,
``minProperties``...). llguidance reports every keyword it cannot enforce ("Unimplemented
keys: [...]", "Unknown format: ...") instead of dropping it, which is what lets mlxd answer
400 rather than produce output that does not match the schema the client sent.

How it plugs into mlx-lm: a :class:`GrammarProcessor` is an mlx-lm logits processor,
``processor(tokens, logits) -> logits``, called once per decoding step per sequence by both
``mlx_lm.generate_step`` and ``BatchGenerator``. ``tokens`` is the 1-D context so far: on the
first call the prompt (or the part of it not in the prompt cache), then one more token per
call, the token sampled at the previous step. The processor feeds those new tokens to its
llguidance matcher, asks it for the bitmask of tokens allowed next and sets every other
logit to ``-inf``.

Output format: compact one-line JSON with ``", "`` and ``": "`` separators (what
``json.dumps`` writes), no whitespace elsewhere, properties in schema order. Free-form
whitespace is deliberately not allowed: small models otherwise emit runs of newlines inside
an object until they run out of tokens.

Typical use (the engine thread)::

    info = tokenizer_info_for(loaded.tokenizer)            # cached per tokenizer
    grammar = compile_json_schema(info, schema)             # GrammarUnsupported -> 400
    processor = GrammarProcessor(grammar)                   # one per sequence
    ... logits_processors=[processor] ...
    processor.error  # None unless the matcher failed; processor.is_finished()

One piece: compiling a schema (rewrites, relaxation, naming what is unsupported) and
enforcing it (the logits processor) share the grammar's representation and llguidance's
details; split, each half would need the other's internals.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Final, cast

import mlx.core as mx
import numpy as np
from llguidance import LLMatcher, LLTokenizer
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

from ..errors import BadRequest
from .schema_finite import has_finite_instance

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

__all__ = [
    "Grammar",
    "GrammarProcessor",
    "GrammarUnsupported",
    "TokenizerInfo",
    "compile_json_object",
    "compile_json_schema",
    "compile_tool_call",
    "compile_tool_calls",
    "tokenizer_info_for",
]

#: JSON compiler options passed as llguidance *overrides*, so that a client's top-level
#: ``"x-guidance"`` key cannot turn on ``lenient`` (silently ignoring unsupported keywords)
#: or free-form whitespace. ``coerce_one_of`` stays off: a ``oneOf`` whose branches are not
#: provably disjoint is refused rather than enforced as ``anyOf``.
_JSON_OPTIONS: Final[JsonCompileOptions] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
    "coerce_one_of": False,
    "lenient": False,
}

_UNIMPLEMENTED_RE: Final = re.compile(r"Unimplemented keys: \[([^\]]*)\]")
_UNKNOWN_FORMAT_RE: Final = re.compile(r"Unknown format: (\S+)")

# Where a JSON Schema keeps subschemas (draft 2020-12 plus the older spellings clients still
# send). Only these positions are rewritten; "const", "enum", "default", "examples" hold data
# that merely looks like a schema and must be left alone.
_ONE: Final = (
    "additionalProperties", "unevaluatedProperties", "propertyNames", "contains", "not",
    "if", "then", "else", "additionalItems", "unevaluatedItems", "items",
)  # fmt: skip
_MAP: Final = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_LIST: Final = ("anyOf", "oneOf", "allOf", "prefixItems", "items")


class GrammarUnsupported(BadRequest):
    """The schema (or tool list) cannot be enforced; the API answers it with a 400.

    Raised for keywords the grammar engine does not implement (the message names them, and
    :attr:`feature` holds them), unknown ``format`` values, remote ``$ref``, look-around in
    ``pattern``, non-disjoint ``oneOf``, and for schemas that are invalid or unsatisfiable.
    Never raised lazily: everything is checked when the grammar is compiled, before any
    token is generated.
    """

    code = "unsupported_schema"

    def __init__(
        self, message: str, *, feature: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message, param=param)
        self.feature = feature


# --------------------------------------------------------------------------------------------
# Tokenizer info
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TokenizerInfo:
    """llguidance's view of one tokenizer: token bytes, token trie and EOS ids.

    Building it walks the whole vocabulary (~0.5 s for 49k tokens), hence
    :func:`tokenizer_info_for` caches one per tokenizer object.
    """

    ll: LLTokenizer
    vocab_size: int
    eos_token_ids: tuple[int, ...]


_info_lock = threading.Lock()
_info_weak: weakref.WeakKeyDictionary[Any, TokenizerInfo] = weakref.WeakKeyDictionary()
# For tokenizer objects that cannot be weakly referenced / hashed; the value keeps the
# object alive so its id() is not reused.
_info_by_id: dict[int, tuple[Any, TokenizerInfo]] = {}


def tokenizer_info_for(tokenizer: Any) -> TokenizerInfo:
    """Build (once per tokenizer object) the llguidance tokenizer for ``tokenizer``.

    Accepts an mlx-lm ``TokenizerWrapper``, a ``transformers`` fast tokenizer or a
    ``tokenizers.Tokenizer``. llguidance reads the tokenizer's own ``tokenizer.json``
    serialization, so byte-level BPE, added and special tokens come out exactly as the model
    sees them; ``transformers`` itself is not needed. EOS ids are the wrapper's
    ``eos_token_ids`` plus ``eos_token_id`` (chat models often have several end-of-turn
    tokens), the same set :mod:`mlxd.engine.loader` gives ``BatchGenerator`` as stop tokens.
    """
    with _info_lock:
        try:
            cached = _info_weak.get(tokenizer)
        except TypeError:
            entry = _info_by_id.get(id(tokenizer))
            cached = entry[1] if entry is not None else None
        if cached is not None:
            return cached
        info = _build_tokenizer_info(tokenizer)
        try:
            _info_weak[tokenizer] = info
        except TypeError:
            _info_by_id[id(tokenizer)] = (tokenizer, info)
        return info


def _build_tokenizer_info(tokenizer: Any) -> TokenizerInfo:
    hf = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx_lm TokenizerWrapper -> HF
    backend = getattr(hf, "backend_tokenizer", None)  # HF fast tokenizer -> tokenizers
    if backend is None and callable(getattr(hf, "to_str", None)):
        backend = hf  # already a tokenizers.Tokenizer
    if backend is None:
        raise GrammarUnsupported(
            "constrained decoding needs a fast (tokenizer.json) tokenizer; "
            f"{type(hf).__name__} has none"
        )
    backend = copy.copy(backend)  # padding/truncation would change what to_str() describes
    backend.no_padding()
    backend.no_truncation()
    # The same set the engine stops on (loader: eos_token_ids plus eos_token_id): a grammar
    # EOS the engine did not stop on would leave the sequence emitting EOS until max_tokens.
    eos: set[int] = set()
    for ids in (getattr(tokenizer, "eos_token_ids", None), getattr(hf, "eos_token_id", None)):
        if ids is not None:
            eos.update([int(ids)] if isinstance(ids, int) else (int(t) for t in ids))
    if not eos:
        raise GrammarUnsupported("constrained decoding needs an end-of-sequence token")
    ll = LLTokenizer(backend.to_str(), eos_token=sorted(eos))
    return TokenizerInfo(ll=ll, vocab_size=int(ll.vocab_size), eos_token_ids=tuple(sorted(eos)))


# --------------------------------------------------------------------------------------------
# Compiling grammars
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Grammar:
    """A compiled, validated grammar for one tokenizer; shareable between requests.

    Holds a pristine llguidance matcher that is never advanced: each
    :class:`GrammarProcessor` starts from a ``deep_copy`` of it (~10 us) instead of
    recompiling (~1 ms or more). ``warnings`` are llguidance's non-fatal remarks, for logs.
    """

    kind: str  # "json_schema" | "json_object" | "tool_call" | "text"
    tokenizer_info: TokenizerInfo
    source: str  # the llguidance grammar (JSON), for logs and debugging
    template: LLMatcher = field(repr=False)
    warnings: tuple[str, ...] = ()
    #: Repeat guard (one call per line, mlxd's call format; see :class:`GrammarProcessor`):
    #: end the output once a complete line repeats an earlier line of it.
    stop_on_repeat: bool = False
    #: Calls whose results the prompt already holds, as the exact lines the grammar writes.
    #: A complete line equal to one of them is followed by a newline and then
    #: ``after_repeat`` (an answer as text) instead of the call grammar; without
    #: ``after_repeat`` the output ends there.
    answered: frozenset[str] = frozenset()
    after_repeat: Grammar | None = field(default=None, repr=False)

    def new_matcher(self) -> LLMatcher:
        """A fresh matcher at the start of the grammar."""
        return self.template.deep_copy()


def compile_json_schema(
    tokenizer_info: TokenizerInfo, schema: Mapping[str, Any], *, strict: bool = True
) -> Grammar:
    """Compile ``response_format: {"type": "json_schema"}``; raises :class:`GrammarUnsupported`.

    ``strict=True`` (OpenAI's ``strict: true``, and the default): an object schema that
    lists ``properties`` but says nothing about other keys (no ``additionalProperties``,
    ``patternProperties`` or ``unevaluatedProperties``) is closed, i.e. the model may only
    write the listed properties. Plain JSON Schema would let it invent extra keys, which
    small models happily do. Objects that are ``allOf`` branches (directly or through
    ``$ref``) are left open, since closing one branch would forbid the other branch's
    properties. ``strict=False`` keeps JSON Schema's defaults. In both modes unsupported
    keywords are an error, never ignored.
    """
    if not isinstance(schema, Mapping):
        raise GrammarUnsupported("the JSON schema must be an object")
    prepared = _prepare_schema(schema, strict=strict)
    return _compile(tokenizer_info, prepared, kind="json_schema")


def compile_json_object(tokenizer_info: TokenizerInfo) -> Grammar:
    """Compile ``response_format: {"type": "json_object"}``: any single JSON object."""
    return _compile(tokenizer_info, {"type": "object"}, kind="json_object")


#: Free text that cannot be read as the start of a call in mlxd's format (a reader tells the
#: two apart from the first character): the ``text`` alternative of :func:`compile_tool_calls`.
_TEXT_RULE: Final = "TEXT: /[^{\\s][\\s\\S]*/"


def compile_text(tokenizer_info: TokenizerInfo) -> Grammar:
    """Free text that does not start with ``{`` or whitespace.

    For ``tool_choice: "none"`` on a model mlxd shows calls to as JSON lines: a small model
    otherwise copies an earlier call's line as its answer. Cached per tokenizer.
    """
    with _info_lock:
        cached = _text_grammars.get(tokenizer_info)
    if cached is not None:
        return cached
    lark = f"start: TEXT\n{_TEXT_RULE}"
    grammar = _compile_source(tokenizer_info, LLMatcher.grammar_from_lark(lark), kind="text")
    with _info_lock:
        _text_grammars[tokenizer_info] = grammar
    return grammar


_text_grammars: weakref.WeakKeyDictionary[TokenizerInfo, Grammar] = weakref.WeakKeyDictionary()


def compile_tool_call(
    tokenizer_info: TokenizerInfo,
    tools: Sequence[Mapping[str, Any]],
    *,
    name: str | None,
    strict: bool = True,
) -> Grammar:
    """Compile one tool call: ``{"name": "<fn>", "arguments": {...}}``.

    ``tools`` are OpenAI tool definitions, either ``{"type": "function", "function":
    {"name", "parameters", ...}}`` (Chat Completions) or the flat ``{"type": "function",
    "name", "parameters"}`` (Responses). With ``name`` (``tool_choice`` naming a function)
    only that function may be called; with ``None`` (``tool_choice: "required"``) any of
    them. ``arguments`` must match the function's ``parameters`` schema (``strict`` as in
    :func:`compile_json_schema`); a function without ``parameters`` takes ``{}``.

    Each function's schema is moved under ``$defs`` and its local ``$ref`` pointers are
    rewritten, so ``"#/$defs/X"`` inside a tool's parameters keeps pointing at that tool's
    own definitions.
    """
    root = _tool_call_schema(tools, name=name, strict=strict)
    return _compile(tokenizer_info, root, kind="tool_call")


#: Most tool calls one constrained generation may contain (``parallel_tool_calls``).
MAX_PARALLEL_CALLS: Final = 8


def compile_tool_calls(
    tokenizer_info: TokenizerInfo,
    tools: Sequence[Mapping[str, Any]],
    *,
    name: str | None = None,
    parallel: bool = False,
    text: bool = False,
    text_schema: Mapping[str, Any] | None = None,
    text_strict: bool = True,
    strict: bool = True,
) -> Grammar:
    """Tool calls, and optionally an answer instead of them (``tool_choice: "auto"``).

    The output is one call as in :func:`compile_tool_call`; with ``parallel`` up to
    :data:`MAX_PARALLEL_CALLS` of them, one per line. With ``text`` the model may instead
    write free text that does not start with ``{`` or whitespace (so a reader can tell the
    two apart from the first character); with ``text_schema`` the alternative is a JSON
    value matching that schema (``response_format`` together with ``tool_choice: "auto"``).
    Built as an llguidance Lark grammar with the JSON schemas embedded via ``%json``.
    """
    relaxed: list[str] = []
    for _ in range(_MAX_RELAXATIONS):
        try:
            grammar = _compile_tool_calls(
                tokenizer_info,
                tools,
                name=name,
                parallel=parallel,
                text=text,
                text_schema=text_schema,
                text_strict=text_strict,
                strict=strict,
            )
        except GrammarUnsupported as exc:
            keywords = [k for k in (exc.feature or "").split(", ") if k and ":" not in k]
            if not keywords or set(keywords) <= set(relaxed):
                raise
            relaxed += keywords
            tools = [_tool_without_keywords(t, set(relaxed)) for t in tools]
            continue
        if relaxed:
            note = f"tool schemas: not enforced: {', '.join(relaxed)}"
            grammar = replace(grammar, warnings=(*grammar.warnings, note))
        return grammar
    raise GrammarUnsupported("tool schemas use too many keywords the grammar cannot enforce")


#: Rounds of dropping unenforceable keywords from tool schemas before giving up.
_MAX_RELAXATIONS: Final = 6


def _tool_without_keywords(tool: Mapping[str, Any], keywords: set[str]) -> dict[str, Any]:
    """A copy of an OpenAI tool definition whose parameter schema lacks ``keywords``.

    Tool schemas come from clients the user does not control (Claude Code sends
    ``propertyNames``); a keyword the grammar cannot enforce is dropped from the tool's
    grammar instead of refusing the request — arguments still follow the rest of the schema.
    ``response_format`` schemas are never relaxed: there the client asked for exactness.
    """

    def strip(node: Any, _keyword: str) -> Any:
        if not isinstance(node, Mapping):
            return node
        return _map_subschemas({k: v for k, v in node.items() if k not in keywords}, strip)

    out = dict(tool)
    fn = out.get("function")
    if isinstance(fn, Mapping) and isinstance(fn.get("parameters"), Mapping):
        out["function"] = {**fn, "parameters": strip(fn["parameters"], "")}
    elif isinstance(out.get("parameters"), Mapping):
        out["parameters"] = strip(out["parameters"], "")
    return out


def _compile_tool_calls(
    tokenizer_info: TokenizerInfo,
    tools: Sequence[Mapping[str, Any]],
    *,
    name: str | None,
    parallel: bool,
    text: bool,
    text_schema: Mapping[str, Any] | None,
    text_strict: bool,
    strict: bool,
) -> Grammar:
    if not parallel and not text and text_schema is None:
        return compile_tool_call(tokenizer_info, tools, name=name, strict=strict)
    call = {**_tool_call_schema(tools, name=name, strict=strict), "x-guidance": dict(_JSON_OPTIONS)}
    rules = [f"call: %json {json.dumps(call)}"]
    calls = f'call ("\\n" call){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else "call"
    alternatives = [calls]
    if text_schema is not None:
        if not isinstance(text_schema, Mapping):
            raise GrammarUnsupported("the JSON schema must be an object")
        answer = {
            **_prepare_schema(text_schema, strict=text_strict),
            "x-guidance": dict(_JSON_OPTIONS),
        }
        rules.append(f"answer: %json {json.dumps(answer)}")
        alternatives.append("answer")
    elif text:
        rules.append("answer: TEXT")
        rules.append(_TEXT_RULE)
        alternatives.append("answer")
    lark = "\n".join([f"start: {' | '.join(alternatives)}", *rules])
    grammar = _compile_source(tokenizer_info, LLMatcher.grammar_from_lark(lark), kind="tool_call")
    # Small models given several calls repeat their first one until max_tokens; the reader
    # drops such a repeat, and the processor ends the output once one is complete.
    return replace(grammar, stop_on_repeat=parallel)


def _tool_call_schema(
    tools: Sequence[Mapping[str, Any]], *, name: str | None, strict: bool
) -> dict[str, Any]:
    """The JSON schema of one call ``{"name", "arguments"}`` to one of ``tools``."""
    functions: list[tuple[str, Mapping[str, Any]]] = []
    for i, tool in enumerate(tools):
        fn = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise GrammarUnsupported(f"tools[{i}] is not a function tool with a name")
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, Mapping):
            raise GrammarUnsupported(f"tools[{i}].function.parameters must be an object")
        functions.append((fn["name"], params))
    if name is not None:
        functions = [f for f in functions if f[0] == name]
        if not functions:
            raise GrammarUnsupported(f"tool_choice names {name!r}, which is not in tools")
    if not functions:
        raise GrammarUnsupported("tool calls need at least one function tool")

    defs: dict[str, Any] = {}
    variants: list[dict[str, Any]] = []
    for i, (fn_name, params) in enumerate(functions):
        key = f"mlxd_tool_{i}"
        prepared = _prepare_schema(params, strict=strict)
        defs[key] = _rebase_refs(prepared, f"#/$defs/{key}")
        variants.append(
            {
                "type": "object",
                "properties": {
                    "name": {"const": fn_name},
                    "arguments": {"$ref": f"#/$defs/{key}"},
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    root: dict[str, Any] = variants[0] if len(variants) == 1 else {"anyOf": variants}
    return {**root, "$defs": defs}


def _compile(info: TokenizerInfo, schema: dict[str, Any], *, kind: str) -> Grammar:
    if not has_finite_instance(schema):
        raise GrammarUnsupported(
            "the JSON schema has no finite instance: a $ref recursion without a base case "
            "(every branch requires itself again). Hint: make the recursive property optional "
            "or add an anyOf branch that ends it.",
            feature="recursion",
        )
    try:
        source = LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
    except (ValueError, TypeError) as exc:  # not serializable / not an object
        raise GrammarUnsupported(f"invalid JSON schema: {exc}") from exc
    return _compile_source(info, source, kind=kind)


def _compile_source(info: TokenizerInfo, source: str, *, kind: str) -> Grammar:
    is_error, messages = LLMatcher.validate_grammar_with_warnings(source, info.ll)
    if is_error:
        raise _unsupported(messages[0] if messages else "invalid JSON schema")
    template = LLMatcher(info.ll, source, log_level=0)
    if template.is_error():  # validation passed, so this is not expected; be safe
        raise _unsupported(template.get_error())
    return Grammar(
        kind=kind,
        tokenizer_info=info,
        source=source,
        template=template,
        warnings=tuple(messages),
    )


def _unsupported(message: str) -> GrammarUnsupported:
    """Turn an llguidance compile error into a client-facing one naming the feature."""
    # llguidance's messages can span lines (regex errors draw a caret under the pattern).
    message = " ".join(line.strip() for line in message.splitlines() if line.strip())
    message = message or "invalid JSON schema"
    if m := _UNIMPLEMENTED_RE.search(message):
        keys = [k.strip().strip('"') for k in m.group(1).split(",") if k.strip()]
        feature = ", ".join(keys)
        return GrammarUnsupported(
            f"JSON schema keyword(s) not supported for constrained decoding: {feature}",
            feature=feature,
        )
    if m := _UNKNOWN_FORMAT_RE.search(message):
        return GrammarUnsupported(
            f'JSON schema "format": {m.group(1)} is not supported for constrained decoding',
            feature=f"format:{m.group(1)}",
        )
    if "oneOf" in message:
        return GrammarUnsupported(
            "JSON schema oneOf is only supported when its branches cannot overlap; "
            "use anyOf instead",
            feature="oneOf",
        )
    return GrammarUnsupported(f"JSON schema not supported for constrained decoding: {message}")


# --------------------------------------------------------------------------------------------
# Schema rewriting
# --------------------------------------------------------------------------------------------


def _map_subschemas(node: Any, fn: Callable[[Any, str], Any]) -> Any:
    """Copy of schema ``node`` with ``fn(subschema, keyword)`` applied to each direct child."""
    if not isinstance(node, Mapping):
        return node
    out = dict(node)
    for key in _ONE:
        if isinstance(out.get(key), Mapping):
            out[key] = fn(out[key], key)
    for key in _MAP:
        if isinstance(out.get(key), Mapping):
            out[key] = {k: fn(v, key) for k, v in out[key].items()}
    for key in _LIST:
        if isinstance(out.get(key), list):
            out[key] = [fn(v, key) for v in out[key]]
    return out


def _prepare_schema(schema: Mapping[str, Any], *, strict: bool) -> dict[str, Any]:
    """Copy ``schema`` into what is compiled: no ``x-guidance``, vacuous keywords dropped,
    objects closed when ``strict``. Never mutates the caller's dict."""
    schema = {k: v for k, v in schema.items() if k != "x-guidance"}
    allof_refs = _allof_ref_targets(schema) if strict else set()

    def visit(node: Any, keyword: str | None, pointer: str) -> Any:
        if not isinstance(node, Mapping):
            return node
        out = dict(node)
        # uniqueItems: false constrains nothing, but llguidance rejects the keyword.
        if out.get("uniqueItems") is False:
            del out["uniqueItems"]
        if (
            strict
            and keyword != "allOf"
            and pointer not in allof_refs
            and "properties" in out
            and not any(
                k in out
                for k in ("additionalProperties", "patternProperties", "unevaluatedProperties")
            )
        ):
            out["additionalProperties"] = False
        return _map_children_with_pointer(out, pointer, visit)

    result = visit(schema, None, "#")
    assert isinstance(result, dict)
    return result


def _map_children_with_pointer(
    node: dict[str, Any], pointer: str, visit: Callable[[Any, str | None, str], Any]
) -> dict[str, Any]:
    """Like :func:`_map_subschemas`, passing each child's JSON pointer (for ``$defs``)."""
    out = dict(node)
    for key in _ONE:
        if isinstance(out.get(key), Mapping):
            out[key] = visit(out[key], key, f"{pointer}/{key}")
    for key in _MAP:
        if isinstance(out.get(key), Mapping):
            out[key] = {
                k: visit(v, key, f"{pointer}/{key}/{_escape_pointer(k)}")
                for k, v in out[key].items()
            }
    for key in _LIST:
        if isinstance(out.get(key), list):
            out[key] = [visit(v, key, f"{pointer}/{key}/{i}") for i, v in enumerate(out[key])]
    return out


def _escape_pointer(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def _allof_ref_targets(schema: Mapping[str, Any]) -> set[str]:
    """JSON pointers that ``allOf`` branches ``$ref`` (those objects must stay open)."""
    found: set[str] = set()

    def walk(node: Any, keyword: str) -> Any:
        if isinstance(node, Mapping):
            if keyword == "allOf" and isinstance(node.get("$ref"), str):
                found.add(node["$ref"])
            _map_subschemas(node, walk)
        return node

    walk(schema, "")
    return found


def _rebase_refs(schema: dict[str, Any], base: str) -> dict[str, Any]:
    """Rewrite document-local ``$ref``s (``#...``) of ``schema`` to live under ``base``."""

    def visit(node: Any, _keyword: str) -> Any:
        if not isinstance(node, Mapping):
            return node
        out = _map_subschemas(node, visit)
        ref = out.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            out["$ref"] = base + ref[1:]
        return out

    result = visit(schema, "")
    assert isinstance(result, dict)
    return result


# --------------------------------------------------------------------------------------------
# The logits processor
# --------------------------------------------------------------------------------------------


class GrammarProcessor:
    """mlx-lm logits processor enforcing a :class:`Grammar` on one sequence.

    Stateful: make one per request (per choice when ``n > 1``); it is not reusable.

    Telling prompt from generated tokens: the first call sees only the prompt (mlx-lm's
    ``generate_step`` passes the uncached prompt, ``BatchGenerator`` the whole prompt), and
    every later call exactly one more token, the one sampled at the previous step. So the
    processor remembers how many tokens it has seen and feeds the matcher ``tokens[seen:]``
    from the second call on. No prompt length has to be passed in, which keeps it right
    when part of the prompt came from the prompt cache.

    EOS: llguidance puts the tokenizer's EOS ids in the mask only when the text so far is a
    complete match, so the model cannot stop early; once the grammar cannot be extended
    (e.g. after the closing ``}``) EOS is the only allowed token.

    Failure: if the matcher ever errors (a disallowed token got sampled anyway, or a parser
    resource limit was hit), :attr:`error` is set and from then on only EOS is allowed, so
    the sequence ends at once; the caller should report the error rather than return the
    text. Raising instead would abort every sequence of a ``BatchGenerator`` step.

    Repeat guard (tool-call grammars, see :attr:`Grammar.stop_on_repeat` and
    :attr:`Grammar.answered`): the processor also follows the output as text, line by line,
    and once a complete call line repeats an earlier line or an answered call it decides the
    next token itself: EOS, or a newline after which :attr:`Grammar.after_repeat` (text)
    replaces the call grammar. A logits processor cannot take tokens back, so the repeat
    itself is generated; the API's reader holds it back and drops it.

    Note mlx-lm samples ahead: the token sampled at step *n* reaches the processor only at
    step *n + 1* (possibly after the caller already saw EOS), so :meth:`is_finished` lags
    one token behind the sampler. Once mlx-lm will no longer call the processor (the
    sequence was removed or finished), :meth:`advance` can feed that last token; calling
    it earlier would feed the token twice.
    """

    def __init__(self, grammar: Grammar) -> None:
        self.grammar = grammar
        info = grammar.tokenizer_info
        self._vocab_size = info.vocab_size
        self._eos: frozenset[int] = frozenset(info.eos_token_ids)
        self._matcher = grammar.new_matcher()
        self._bitmask = allocate_token_bitmask(1, info.vocab_size)
        self._seen: int | None = None
        self._eos_consumed = False
        self._error: str | None = None
        self._eos_only: dict[int, mx.array] = {}  # logits width -> EOS-only boolean mask
        # The repeat guard: the output's complete lines so far and the line being written.
        self._guard = grammar.stop_on_repeat or bool(grammar.answered)
        self._answered = {line.encode() for line in grammar.answered}
        self._lines: set[bytes] = set()
        self._line = b""
        self._force: str | None = None  # "eos" | "newline": the guard decided the next token
        self._newline_only: dict[int, mx.array] = {}

    # -- state ----------------------------------------------------------------------------

    @property
    def error(self) -> str | None:
        """Why the matcher failed (first line of llguidance's message), or None."""
        return self._error

    def is_finished(self) -> bool:
        """True when the tokens fed so far are a complete match that cannot be extended
        (or EOS was consumed after a complete match): only EOS may follow."""
        if self._error is not None:
            return False
        return self._eos_consumed or self._force == "eos" or self._matcher.is_stopped()

    def is_accepting(self) -> bool:
        """True when the tokens fed so far form a complete match (EOS would be allowed)."""
        if self._error is not None:
            return False
        return self._eos_consumed or self._force == "eos" or self._matcher.is_accepting()

    def advance(self, token_ids: Iterable[int]) -> None:
        """Feed generated tokens to the matcher (done automatically by ``__call__``)."""
        for token in token_ids:
            if self._error is not None or self._eos_consumed:
                return
            token = int(token)
            if token in self._eos:
                if self._force == "eos" or self._matcher.is_accepting():
                    self._eos_consumed = True
                else:
                    self._error = "end of sequence before the output matched the grammar"
                return
            if self._force == "newline":  # the newline the guard asked for: now the answer
                self._start_answer()
                continue
            if not self._matcher.consume_token(token):
                self._error = _first_line(self._matcher.get_error()) or "token rejected"
            elif self._guard:
                self._watch(token)

    # -- the repeat guard -----------------------------------------------------------------

    def _watch(self, token: int) -> None:
        """Follow the output line by line (one call per line) and decide the next token
        when a complete line repeats an earlier one or an answered call.

        A repeat of an earlier line of this output ends it (EOS; the reader drops the
        repeat). A repeat of a call whose result the prompt already holds is followed by a
        newline and then an answer in text (``Grammar.after_repeat``): the reader drops
        the repeat, and the model writes its answer having "seen" the call once more. When
        the newline arrived inside the token that closed the line, the answer starts at
        once.
        """
        piece = self.grammar.tokenizer_info.ll.decode_bytes([token])
        if not self._lines and not self._line and not piece.startswith(b"{"):
            self._guard = False  # the output is an answer, not calls
            return
        *done, self._line = (self._line + piece).split(b"\n")
        for i, line in enumerate(done):
            last = i == len(done) - 1
            if line in self._answered and self.grammar.after_repeat is not None:
                if last and not self._line:
                    self._start_answer()
                    return
                self._force = "eos"
            elif line in self._answered or (self.grammar.stop_on_repeat and line in self._lines):
                self._force = "eos"
            self._lines.add(line)
        if self._force is not None or not self._line.endswith(b"}"):
            return
        if not self._matcher.is_accepting():
            return
        line = self._line
        if line in self._answered and self.grammar.after_repeat is not None:
            self._force = "newline" if self._newline_token() is not None else "eos"
        elif line in self._answered or (self.grammar.stop_on_repeat and line in self._lines):
            self._force = "eos"

    def _start_answer(self) -> None:
        assert self.grammar.after_repeat is not None
        self._matcher = self.grammar.after_repeat.new_matcher()
        self._force = None
        self._guard = False
        self._line = b""

    def _newline_token(self) -> int | None:
        """The tokenizer's single token for ``"\\n"``, or None when it has none."""
        ids = self.grammar.tokenizer_info.ll.tokenize_str("\n")
        return int(ids[0]) if len(ids) == 1 else None

    # -- the mlx-lm hook ------------------------------------------------------------------

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        """Mask ``logits`` (shape ``(1, vocab)`` or ``(vocab,)``) to the allowed tokens."""
        n = int(tokens.shape[-1])
        if self._seen is None:
            self._seen = n  # the prompt: nothing generated yet
        elif n > self._seen:
            new = cast(list[int], tokens.reshape(-1)[self._seen :].tolist())
            self._seen = n
            self.advance(new)
        else:
            self._seen = n  # context did not grow (not expected); feed nothing

        width = int(logits.shape[-1])
        if self._error is not None or self._eos_consumed or self._force == "eos":
            allowed = self._eos_only_mask(width)
        elif self._force == "newline":
            allowed = self._newline_mask(width)
        else:
            fill_next_token_bitmask(self._matcher, self._bitmask)
            if self._matcher.is_error():
                self._error = _first_line(self._matcher.get_error()) or "matcher error"
                allowed = self._eos_only_mask(width)
            else:
                allowed = self._to_bool(self._bitmask, width)
        return mx.where(allowed, logits, mx.array(-mx.inf, dtype=logits.dtype))

    def _to_bool(self, bitmask: np.ndarray[Any, Any], width: int) -> mx.array:
        """Unpack llguidance's int32 bitmask (bit i of word i//32 = token i) to ``width``
        booleans. Logits may be wider than the tokenizer (embedding rows padded to a
        multiple of 64/128): the extra ids are never allowed. Narrower logits drop the
        tail."""
        bits = np.unpackbits(bitmask.view(np.uint8), bitorder="little", count=self._vocab_size)
        if width > bits.shape[0]:
            bits = np.concatenate([bits, np.zeros(width - bits.shape[0], dtype=np.uint8)])
        elif width < bits.shape[0]:
            bits = bits[:width]
        return mx.array(bits.astype(np.bool_))

    def _newline_mask(self, width: int) -> mx.array:
        mask = self._newline_only.get(width)
        if mask is None:
            bits = np.zeros(width, dtype=np.bool_)
            token = self._newline_token()
            assert token is not None  # checked before the guard asks for a newline
            bits[token] = True
            mask = self._newline_only[width] = mx.array(bits)
        return mask

    def _eos_only_mask(self, width: int) -> mx.array:
        mask = self._eos_only.get(width)
        if mask is None:
            bits = np.zeros(width, dtype=np.bool_)
            for t in self._eos:
                if t < width:
                    bits[t] = True
            mask = self._eos_only[width] = mx.array(bits)
        return mask


def _first_line(message: str) -> str:
    lines = message.strip().splitlines()
    return lines[0] if lines else ""
