"""Function calling and structured output, shared by Chat Completions and Responses.

One :class:`OutputPlan` per request decides, before anything is generated:

* which tools the prompt shows (the chat template's own ``tools`` support where the model has
  a tool-call format mlx-lm knows, else a short system note mlxd writes itself);
* which grammar constrains decoding (:mod:`mlxd.engine.constrain`), if any;
* how the generated text is read back: :class:`OutputReader` turns content deltas into text
  and tool calls, incrementally, so both APIs can stream call arguments as they are made.

The constrained call format is mlxd's own: one compact JSON object per call,
``{"name": "<function>", "arguments": {...}}``, one per line for parallel calls. A model
whose template has native tool support and ``tool_choice: "auto"`` without a JSON
``response_format`` is left unconstrained and read with mlx-lm's parser for its format
(``<tool_call>...</tool_call>`` and friends).

One piece: planning (what the prompt and the grammar allow) and reading back (what the
reader accepts) are two halves of one call format; kept together, a change to the format is
made in one place.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from ..engine.constrain import (
    Grammar,
    compile_json_object,
    compile_json_schema,
    compile_text,
    compile_tool_calls,
    tokenizer_info_for,
)
from ..engine.loader import LoadedModel
from ..errors import BadRequest

Mode = Literal["none", "auto", "required"]


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# -- request fields ---------------------------------------------------------------------------
def function_tools(raw: list[Any] | None, *, param: str = "tools") -> list[dict[str, Any]]:
    """The request's function tools as ``{"name", "description", "parameters"}``.

    Accepts the Chat shape ``{"type": "function", "function": {...}}`` and the flat
    Responses shape ``{"type": "function", "name", ...}``. Other tool types (``custom``,
    ``web_search``, ...) are ignored, not rejected: mlxd cannot run them.
    """
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, tool in enumerate(raw or []):
        if not isinstance(tool, Mapping):
            raise BadRequest("each tool must be an object", param=f"{param}[{i}]")
        if tool.get("type", "function") != "function":
            continue
        fn = tool.get("function", tool)
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.:-]{1,128}", name):
            raise BadRequest(
                "a function tool needs a name of letters, digits, '_', '-', '.' or ':'",
                param=f"{param}[{i}].name",
                code="invalid_value",
            )
        if name in seen:
            raise BadRequest(
                f"function {name!r} is defined twice", param=f"{param}[{i}]", code="invalid_value"
            )
        seen.add(name)
        params = fn.get("parameters")
        if params is not None and not isinstance(params, Mapping):
            raise BadRequest(
                "function parameters must be a JSON schema object",
                param=f"{param}[{i}].parameters",
                code="invalid_value",
            )
        entry: dict[str, Any] = {
            "name": name,
            "description": fn.get("description") or "",
            "parameters": dict(params) if params else {"type": "object", "properties": {}},
        }
        if fn.get("strict") is False:
            entry["strict"] = False
        out.append(entry)
    return out


def tool_choice(raw: Any, functions: list[dict[str, Any]]) -> tuple[Mode, str | None]:
    """``(mode, function name)`` from ``tool_choice`` (either API's spelling)."""
    if raw is None:
        return ("auto" if functions else "none"), None
    if raw in ("none", "auto", "required"):
        mode: Mode = raw
        if mode == "required" and not functions:
            raise BadRequest(
                "tool_choice 'required' needs at least one function tool",
                param="tool_choice",
                code="invalid_value",
            )
        return (mode if functions else "none"), None
    if isinstance(raw, Mapping):
        if raw.get("type") != "function":
            return ("auto" if functions else "none"), None  # hosted/allowed_tools: no effect
        fn = raw.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else raw.get("name")
        if not isinstance(name, str):
            raise BadRequest(
                "tool_choice of type 'function' needs the function's name",
                param="tool_choice",
                code="invalid_value",
            )
        if name not in {f["name"] for f in functions}:
            raise BadRequest(
                f"tool_choice names function {name!r}, which is not in tools",
                param="tool_choice",
                code="invalid_value",
            )
        return "required", name
    raise BadRequest(
        "tool_choice must be 'none', 'auto', 'required' or a function",
        param="tool_choice",
        code="invalid_value",
    )


@dataclass(frozen=True)
class JsonFormat:
    """A JSON ``response_format`` / ``text.format``: any object, or one schema."""

    schema: dict[str, Any] | None  # None: json_object
    strict: bool = True


def json_format(raw: Any, *, param: str, flat: bool) -> JsonFormat | None:
    """Chat ``response_format`` (``flat=False``) or Responses ``text.format`` (``flat``)."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise BadRequest("must be an object", param=param, code="invalid_value")
    kind = raw.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return JsonFormat(None)
    if kind == "json_schema":
        spec = raw if flat else raw.get("json_schema")
        where = param if flat else f"{param}.json_schema"
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema"), Mapping):
            raise BadRequest(
                "json_schema needs a 'schema' object", param=f"{where}.schema", code="invalid_value"
            )
        # strict: false keeps plain JSON Schema semantics (objects stay open); the output is
        # enforced either way.
        return JsonFormat(dict(spec["schema"]), strict=spec.get("strict") is not False)
    raise BadRequest(
        f"format type {kind!r} is not supported (text, json_object, json_schema)",
        param=f"{param}.type",
        code="unsupported_value",
    )


# -- the plan -------------------------------------------------------------------------------
@dataclass
class OutputPlan:
    """How one request's prompt shows tools and how its output is constrained and read."""

    functions: list[dict[str, Any]]
    mode: Mode
    name: str | None
    parallel: bool
    native: bool  # the chat template renders tools; mlx-lm knows the model's call format
    fmt: JsonFormat | None
    grammar: Grammar | None = None
    parser: Callable[[str, Any], Any] | None = None
    markers: tuple[str, str] | None = None
    #: The calls whose results end the prompt (name, arguments as the grammar writes them):
    #: an exact repeat of one is dropped and followed by an answer (see :meth:`prepare`).
    answered: tuple[tuple[str, str], ...] = ()

    @property
    def calls_possible(self) -> bool:
        return self.mode != "none"

    @property
    def template_tools(self) -> list[dict[str, Any]] | None:
        """Tools for ``apply_chat_template`` (Chat shape), on models that render them."""
        if not (self.native and self.calls_possible):
            return None
        return [{"type": "function", "function": f} for f in self.functions]

    def prepare(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Messages ready for the template: tool calls and results in a form it renders."""
        out = [_native_message(m) for m in messages] if self.native else _plain_messages(messages)
        if self.grammar is not None and self.grammar.after_repeat is not None:
            self.answered = answered_calls(messages)
            lines = frozenset(_call_line(name, args) for name, args in self.answered)
            self.grammar = replace(self.grammar, answered=lines)
        note = self._note()
        if note:
            if out and out[0]["role"] == "system":
                out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{note}".strip()}
            else:
                out.insert(0, {"role": "system", "content": note})
        return out

    def _note(self) -> str:
        """The instruction mlxd adds: tool list and call format (its own grammar only)."""
        if not self.calls_possible or (self.native and self.grammar is None):
            return ""
        lines = []
        if not self.native:
            lines.append("You can call these functions:")
            for f in self.functions:
                spec = {"name": f["name"], "parameters": f["parameters"]}
                if f["description"]:
                    spec["description"] = f["description"]
                lines.append(json.dumps(spec))
        example = '{"name": "<function name>", "arguments": {<arguments>}}'
        several = " (one per line for several calls)" if self.parallel else ""
        if self.mode == "required":
            which = f"the function {self.name}" if self.name else "a function"
            lines.append(f"You must call {which}: reply with only {example}{several}.")
        else:
            lines.append(
                f"To call a function, reply with only {example}{several}. "
                "Otherwise answer the user directly."
            )
        return "\n".join(lines)

    def reader(self) -> OutputReader:
        return OutputReader(self)


def plan_output(
    lm: LoadedModel,
    *,
    tools: list[Any] | None,
    choice: Any,
    parallel: bool | None,
    fmt: JsonFormat | None,
) -> OutputPlan:
    """Validate the tool and format fields and compile the grammar (no MLX; may take ~0.5 s
    the first time a tokenizer is seen, so callers run it off the event loop)."""
    functions = function_tools(tools)
    mode, name = tool_choice(choice, functions)
    tokenizer = lm.tokenizer
    native = bool(getattr(tokenizer, "has_tool_calling", False))
    plan = OutputPlan(
        functions=functions,
        mode=mode,
        name=name,
        parallel=parallel is not False and name is None,
        native=native,
        fmt=fmt,
    )
    if native:
        start, end = tokenizer.tool_call_start, tokenizer.tool_call_end
        plan.markers = (start, end)
        plan.parser = tokenizer.tool_parser
    if native and mode in ("none", "auto") and fmt is None:
        return plan  # the model's own format, read back with mlx-lm's parser
    if mode == "none" and fmt is None and not functions:
        return plan
    info = tokenizer_info_for(tokenizer)
    if mode == "none" and fmt is None:
        # Earlier calls are shown to this model as JSON lines; it would copy one as text.
        plan.grammar = compile_text(info)
        return plan
    if mode == "none":
        assert fmt is not None
        if fmt.schema is None:
            plan.grammar = compile_json_object(info)
        else:
            plan.grammar = compile_json_schema(info, fmt.schema, strict=fmt.strict)
        return plan
    strict = all(f.get("strict") is not False for f in functions)
    text_schema: dict[str, Any] | None = None
    if mode == "auto" and fmt is not None:
        text_schema = fmt.schema if fmt.schema is not None else {"type": "object"}
    plan.grammar = compile_tool_calls(
        info,
        functions,
        name=name,
        parallel=plan.parallel,
        text=mode == "auto" and fmt is None,
        text_schema=text_schema,
        text_strict=fmt.strict if fmt is not None else True,
        strict=strict,
    )
    if mode == "auto" and fmt is None:
        plan.grammar = replace(plan.grammar, after_repeat=compile_text(info))
    return plan


def answered_calls(messages: list[dict[str, Any]]) -> tuple[tuple[str, str], ...]:
    """The calls of the last assistant turn whose results end ``messages``, as ``(name,
    arguments)`` with the arguments re-serialized the way mlxd's grammar writes them.

    A small model shown a tool result tends to call the same tool with the same arguments
    again, and an agent loop then never ends; these are the calls that would be exact
    repeats. Arguments that are not JSON cannot be repeated by the grammar and are skipped.
    """
    results: set[str] = set()
    i = len(messages)
    while i and messages[i - 1].get("role") in ("tool", "function"):
        i -= 1
        results.add(str(messages[i].get("tool_call_id")))
    if not results or not i or messages[i - 1].get("role") != "assistant":
        return ()
    out = []
    for call in messages[i - 1].get("tool_calls") or []:
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping):
            continue
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                continue
        if isinstance(fn.get("name"), str) and isinstance(args, dict):
            out.append((fn["name"], json.dumps(args, ensure_ascii=False)))
    return tuple(out)


def _call_line(name: str, arguments: str) -> str:
    """One call in mlxd's format, exactly as the grammar writes it."""
    return f'{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {arguments}}}'


def _native_message(m: dict[str, Any]) -> dict[str, Any]:
    """Templates with tool support expect ``arguments`` as an object (mlx-lm does the same)."""
    calls = m.get("tool_calls")
    if not calls:
        return m
    fixed = []
    for call in calls:
        fn = dict(call.get("function") or {})
        args = fn.get("arguments")
        if isinstance(args, str):
            with contextlib.suppress(json.JSONDecodeError):  # else keep the client's text
                fn["arguments"] = json.loads(args) if args.strip() else {}
        fixed.append({**call, "function": fn})
    return {**m, "tool_calls": fixed}


def _plain_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For templates without tool support: calls as the JSON lines mlxd's grammar produces,
    results as user messages naming the function (consecutive results merged)."""
    names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for m in messages:
        calls = m.get("tool_calls")
        if m["role"] == "assistant" and calls:
            lines = [m.get("content") or ""]
            for call in calls:
                fn = call.get("function") or {}
                names[str(call.get("id"))] = str(fn.get("name", ""))
                args = fn.get("arguments") or "{}"
                if isinstance(args, str):
                    with contextlib.suppress(json.JSONDecodeError):
                        args = json.loads(args)
                lines.append(json.dumps({"name": fn.get("name"), "arguments": args}))
            out.append({"role": "assistant", "content": "\n".join(x for x in lines if x)})
        elif m["role"] in ("tool", "function"):
            name = m.get("name") or names.get(str(m.get("tool_call_id")), "")
            label = f"The function {name} returned" if name else "The function returned"
            text = f"{label}: {m.get('content') or ''}"
            if out and out[-1].get("_tool_result"):
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "user", "content": text, "_tool_result": True})
        else:
            out.append({k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")})
    for m in out:
        m.pop("_tool_result", None)
    return out


# -- reading the output back ------------------------------------------------------------------
@dataclass
class Call:
    """One tool call as it is read: the name is known first, arguments grow."""

    index: int
    name: str
    id: str = field(default_factory=new_call_id)
    arguments: str = ""


@dataclass(frozen=True)
class CallStarted:
    call: Call


@dataclass(frozen=True)
class CallArguments:
    call: Call
    delta: str


@dataclass(frozen=True)
class Text:
    text: str


ReadEvent = Text | CallStarted | CallArguments

_CALL_HEAD = re.compile(r'\{"name": "((?:[^"\\]|\\.)*)", "arguments": ')


class OutputReader:
    """Splits generated content into text and tool calls, incrementally.

    Grammar-constrained output (mlxd's format): while the first characters could still be
    the start of a call they are held back; then it is either text (passed through) or a
    sequence of calls whose arguments stream as they are generated. A call that repeats an
    earlier one of the same output exactly is dropped (small models given
    ``parallel_tool_calls`` tend to repeat their first call), and so is one that repeats a
    call whose result the prompt already holds (:attr:`OutputPlan.answered`; text may
    follow it): it is held back while it still matches, and released as soon as it
    differs. Native formats: text
    until the model's call-start marker, then the call text is buffered until the end
    marker and parsed with mlx-lm's parser for the model.
    """

    def __init__(self, plan: OutputPlan) -> None:
        self.plan = plan
        self.calls: list[Call] = []
        self.text: list[str] = []
        self._buf = ""
        self._state = "start" if plan.calls_possible else "text"
        self._depth = 0
        self._in_str = False
        self._esc = False
        self._native = plan.native and plan.grammar is None and plan.calls_possible
        self._heads = [f'{{"name": {json.dumps(f["name"])}, "arguments": ' for f in plan.functions]
        self._held: Call | None = None  # a call that so far repeats an earlier one
        # Calls whose results the prompt holds: repeating one is dropped like an in-output
        # repeat (the grammar then has the model answer in text).
        self._answered = [Call(-1, n, id="", arguments=a) for n, a in plan.answered]

    def feed(self, content: str) -> list[ReadEvent]:
        if not content:
            return []
        if self._state == "text" and not self._native:
            self.text.append(content)
            return [Text(content)]
        self._buf += content
        return self._native_drain(final=False) if self._native else self._drain()

    def finish(self) -> list[ReadEvent]:
        """End of output: release what is held back; a cut-off call keeps partial arguments."""
        if self._native:
            return self._native_drain(final=True)
        events: list[ReadEvent] = []
        if self._state in ("start", "between") and self._buf:
            events.append(self._to_text())
        return events

    # mlxd's grammar format -------------------------------------------------------------
    def _to_text(self) -> Text:
        text, self._buf, self._state = self._buf, "", "text"
        self.text.append(text)
        return Text(text)

    def _drain(self) -> list[ReadEvent]:
        events: list[ReadEvent] = []
        while self._buf:
            if self._state in ("start", "between"):
                if self._state == "between":
                    stripped = self._buf.lstrip()
                    if not stripped:
                        self._buf = ""
                        break
                    self._buf = stripped
                m = _CALL_HEAD.match(self._buf)
                if m is None:
                    # Text after calls: the answer written after a dropped repeat of an
                    # answered call (the grammar allows it nowhere else).
                    if not any(h.startswith(self._buf) for h in self._heads):
                        events.append(self._to_text())
                    break  # a call head still arriving
                name = json.loads(f'"{m.group(1)}"')
                self._held = Call(index=len(self.calls), name=name)
                self._buf = self._buf[m.end() :]
                self._state, self._depth, self._in_str, self._esc = "args", 0, False, False
                events += self._release_unless_repeat()
            elif self._state == "args":
                end = self._scan_arguments()
                piece, self._buf = self._buf[:end], self._buf[end:]
                if self._held is not None:
                    self._held.arguments += piece
                    events += self._release_unless_repeat()
                elif piece:
                    self.calls[-1].arguments += piece
                    events.append(CallArguments(self.calls[-1], piece))
                if self._state == "args":
                    break
                self._held = None  # the call ended as an exact repeat: dropped
            elif self._state == "close":
                if self._buf.startswith("}"):
                    self._buf = self._buf[1:]
                    self._state = "between"
                else:
                    break
            else:  # text: cannot happen with a buffer; be safe
                events.append(self._to_text())
        return events

    def _release_unless_repeat(self) -> list[ReadEvent]:
        """Emit the held call once it no longer matches the start of an earlier call."""
        held = self._held
        assert held is not None
        complete = self._state == "close"
        for c in (*self._answered, *self.calls):
            if c.name == held.name and (
                c.arguments == held.arguments
                if complete
                else c.arguments.startswith(held.arguments)
            ):
                return []
        self._held = None
        self.calls.append(held)
        events: list[ReadEvent] = [CallStarted(held)]
        if held.arguments:
            events.append(CallArguments(held, held.arguments))
        return events

    def _scan_arguments(self) -> int:
        """How much of the buffer belongs to the arguments object; ends the object state."""
        for i, ch in enumerate(self._buf):
            if self._in_str:
                if self._esc:
                    self._esc = False
                elif ch == "\\":
                    self._esc = True
                elif ch == '"':
                    self._in_str = False
            elif ch == '"':
                self._in_str = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self._state = "close"
                    return i + 1
        return len(self._buf)

    # native formats -------------------------------------------------------------------
    def _native_drain(self, *, final: bool) -> list[ReadEvent]:
        assert self.plan.markers is not None
        start, end = self.plan.markers
        events: list[ReadEvent] = []
        while self._buf:
            if self._state != "call":
                i = self._buf.find(start)
                if i < 0:
                    keep = 0 if final else _held(self._buf, start)
                    text = self._buf[: len(self._buf) - keep]
                    self._buf = self._buf[len(text) :]
                    if text:
                        self.text.append(text)
                        events.append(Text(text))
                    break
                if i:
                    self.text.append(self._buf[:i])
                    events.append(Text(self._buf[:i]))
                self._buf = self._buf[i + len(start) :]
                self._state = "call"
                continue
            j = self._buf.find(end) if end else -1
            if j < 0 and not final:
                break
            body = self._buf if j < 0 else self._buf[:j]
            self._buf = "" if j < 0 else self._buf[j + len(end) :]
            self._state = "text"
            events.extend(self._parse_native(body))
        return events

    def _parse_native(self, body: str) -> list[ReadEvent]:
        assert self.plan.parser is not None
        tools = [{"type": "function", "function": f} for f in self.plan.functions]
        try:
            parsed = self.plan.parser(body, tools)
        except (ValueError, KeyError, IndexError, TypeError):
            self.text.append(body)  # not a call after all: keep the text rather than lose it
            return [Text(body)]
        events: list[ReadEvent] = []
        for item in parsed if isinstance(parsed, list) else [parsed]:
            args = item.get("arguments", {})
            call = Call(index=len(self.calls), name=str(item.get("name", "")))
            call.arguments = args if isinstance(args, str) else json.dumps(args)
            self.calls.append(call)
            events += [CallStarted(call), CallArguments(call, call.arguments)]
        return events


def _held(text: str, marker: str) -> int:
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
