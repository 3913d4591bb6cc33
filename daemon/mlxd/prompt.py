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
