"""Per-token log-probabilities as the APIs show them: token text, UTF-8 bytes, alternatives.

The engine puts token ids and log-probabilities on its events
(:class:`~mlxd.engine.protocol.TokenLogprob`); the pipeline turns them into a
:class:`Logprobs` piece with each token's text and bytes, yielded just before the text of the
same engine event, so a renderer attaches them to the next frame of that choice. The
distribution is the one mlx-lm samples from: after logits processors (repetition penalty,
grammar masks), before temperature and top-p/top-k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..engine.protocol import TokenLogprob


@dataclass(frozen=True)
class Alternative:
    token: str
    bytes: tuple[int, ...]
    logprob: float


@dataclass(frozen=True)
class Entry:
    """One token: its text, bytes and logprob, and the most likely tokens at its place
    (``None`` for a prompt's first token, which nothing predicts)."""

    token: str
    bytes: tuple[int, ...]
    logprob: float | None
    top: tuple[Alternative, ...] | None

    def wire(self) -> dict[str, Any]:
        """Chat Completions' and the Responses API's shape."""
        return {
            "token": self.token,
            "logprob": self.logprob,
            "bytes": list(self.bytes),
            "top_logprobs": [
                {"token": a.token, "logprob": a.logprob, "bytes": list(a.bytes)}
                for a in self.top or ()
            ],
        }


@dataclass(frozen=True)
class Logprobs:
    """A pipeline piece: the entries of the tokens generated since the last one."""

    entries: tuple[Entry, ...]


class TokenText:
    """Token id → the token's bytes and display text, for one tokenizer (no MLX).

    Byte-level BPE vocabularies (GPT-2 style) map each byte to a printable character;
    SentencePiece writes a space as ``▁`` and raw bytes as ``<0xNN>``; anything else is
    decoded alone. A token that is not whole UTF-8 (part of a character) is shown as
    ``bytes:\\xNN...``, OpenAI's convention.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        name = type(getattr(tokenizer, "_detokenizer", None)).__name__
        self._kind = "bpe" if "BPE" in name else "spm" if "SPM" in name else "plain"
        self._seen: dict[int, tuple[str, tuple[int, ...]]] = {}

    def token(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        found = self._seen.get(token_id)
        if found is None:
            raw = self._bytes(token_id)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            found = self._seen[token_id] = (text, tuple(raw))
        return found

    def _bytes(self, token_id: int) -> bytes:
        if self._kind != "plain":
            piece = self._tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(piece, str):
                if self._kind == "bpe":
                    from mlx_lm.tokenizer_utils import _byte_decoder

                    decoder = _byte_decoder()
                    if all(c in decoder for c in piece):
                        return bytes(decoder[c] for c in piece)
                elif piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
                    return bytes([int(piece[3:5], 16)])
                else:
                    return piece.replace("\u2581", " ").encode("utf-8")
        return str(self._tokenizer.decode([token_id])).encode("utf-8")

    def entry(self, item: TokenLogprob) -> Entry:
        token, raw = self.token(item.token)
        top = []
        for token_id, logprob in item.top:
            alt, alt_raw = self.token(token_id)
            top.append(Alternative(alt, alt_raw, logprob))
        return Entry(token, raw, item.logprob, tuple(top))

    def prompt(self, ids: list[int], scored: list[TokenLogprob]) -> list[Entry]:
        """A scored prompt's entries: its first token without a logprob, then the rest."""
        token, raw = self.token(ids[0])
        return [Entry(token, raw, None, None), *(self.entry(s) for s in scored)]


def legacy(entries: list[Entry], offset: int) -> dict[str, Any]:
    """The completions API's shape for ``entries`` whose text starts at character ``offset``
    of the choice's text (parallel lists; alternatives as a token → logprob object)."""
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [
            None if e.top is None else {a.token: a.logprob for a in e.top} for e in entries
        ],
        "text_offset": offsets,
    }
