"""OpenAI-style messages to prompt token ids, through the model's own chat template."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from .engine.loader import LoadedModel
from .errors import BadRequest, ContextLengthExceeded

_TEXT_PARTS = {"text", "input_text", "output_text"}
_TOKEN_BYTES: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    in_think: bool  # the template opened a <think> block the model continues


def content_text(content: Any, *, param: str) -> str:
    """A message's content (string, list of text parts, or None) as plain text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if isinstance(part, str):
                texts.append(part)
                continue
            if not isinstance(part, dict):
                raise BadRequest("content parts must be objects", param=f"{param}[{i}]")
            kind = part.get("type")
            if kind in _TEXT_PARTS:
                text = part.get("text")
                if not isinstance(text, str):
                    raise BadRequest(
                        "a text part needs a string 'text'", param=f"{param}[{i}].text"
                    )
                texts.append(text)
            elif kind == "refusal":
                texts.append(str(part.get("refusal", "")))
            else:
                raise BadRequest(
                    f"content part type {kind!r} is not supported by this model (text only)",
                    param=f"{param}[{i}].type",
                    code="unsupported_content",
                )
        return "".join(texts)
    raise BadRequest("content must be a string, a list of parts, or null", param=param)


def build_prompt(
    lm: LoadedModel, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> Prompt:
    """Render ``messages`` with the chat template and tokenize (no MLX: any thread may call)."""
    tokenizer = lm.tokenizer
    kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": True}
    if tools:
        kwargs["tools"] = tools
    if getattr(tokenizer, "chat_template", None) or getattr(
        tokenizer._tokenizer, "chat_template", None
    ):
        try:
            text = tokenizer.apply_chat_template(messages, **kwargs)
        except Exception as exc:  # jinja errors: templates raise on role orders they reject
            raise BadRequest(f"the model's chat template rejected these messages: {exc}") from exc
    else:
        text = "".join(f"{m['role']}: {m.get('content') or ''}\n" for m in messages) + "assistant:"
    refuse_if_hopeless(lm, text)
    ids = tokenizer.encode(text, add_special_tokens=False)
    stripped = text.rstrip()
    return Prompt(ids=list(ids), in_think=stripped.endswith("<think>"))


def max_token_bytes(tokenizer: Any) -> int:
    """The most UTF-8 bytes one token of ``tokenizer`` can stand for (an upper bound).

    Vocabulary strings are measured as UTF-8; byte-level markers (``Ġ``) and SentencePiece's
    ``▁`` are longer there than the bytes they decode to, so the bound only errs upward.
    """
    known = _TOKEN_BYTES.get(tokenizer)
    if known is None:
        inner = getattr(tokenizer, "_tokenizer", None)
        if inner is None:
            inner = tokenizer
        vocab = inner.get_vocab()
        known = max((len(piece.encode("utf-8", "replace")) for piece in vocab), default=1)
        _TOKEN_BYTES[tokenizer] = known = max(known, 1)
    return known


def refuse_if_hopeless(lm: LoadedModel, text: str, param: str = "messages") -> None:
    """A prompt that cannot fit even if every token were the longest one is refused before
    tokenizing: tokenizing 10 MB takes many seconds to learn what the byte count already says.
    """
    size = len(text.encode("utf-8", "surrogatepass"))
    at_least = -(-size // max_token_bytes(lm.tokenizer))
    if at_least > lm.context_length:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {lm.context_length} tokens. However, your "
            f"messages resulted in at least {at_least} tokens ({size} bytes of prompt). Please "
            "reduce the length of the messages.",
            param=param,
        )


#: What the raw-prompt routes accept: a text, texts, token ids, or lists of token ids.
RawPrompts = str | list[str] | list[int] | list[list[int]]


def token_lists(lm: LoadedModel, value: RawPrompts, *, param: str, room: int) -> list[list[int]]:
    """Each raw prompt (``/v1/completions``' prompt, ``/v1/embeddings``' input) as token ids
    (no chat template, no MLX: any thread may call). Empty prompts, token ids outside the
    vocabulary and prompts that leave fewer than ``room`` tokens of the context (1 for a
    completion, 0 for an embedding) are 400s naming the item."""
    items: list[str | list[int]] = []
    if isinstance(value, str):
        items.append(value)
    elif all(isinstance(t, int) for t in value):
        items.append([t for t in value if isinstance(t, int)])  # one list of token ids
    else:
        items.extend(v for v in value if not isinstance(v, int))
    vocab = int(lm.config.get("vocab_size", 0)) or len(lm.tokenizer.vocab)
    out: list[list[int]] = []
    for i, item in enumerate(items):
        where = param if len(items) == 1 else f"{param}[{i}]"
        if isinstance(item, str):
            refuse_if_hopeless(lm, item, where)  # a 10 MB text is refused by its size
        ids = list(lm.tokenizer.encode(item)) if isinstance(item, str) else item
        if not ids:
            raise BadRequest(f"{where} is empty", param=where, code="invalid_value")
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise BadRequest(
                f"token id {bad} is outside this model's vocabulary (0 to {vocab - 1})",
                param=where,
                code="invalid_value",
            )
        if len(ids) + room > lm.context_length:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {lm.context_length} tokens. However, "
                f"{where} has {len(ids)} tokens. Please reduce it.",
                param=where,
            )
        out.append(ids)
    return out
