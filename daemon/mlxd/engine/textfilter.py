"""Turn a stream of decoded text pieces into content, reasoning and a stop decision.

Two jobs, both on text that arrives in arbitrary pieces (a tag or a stop string may be split
across tokens and across stream chunks):

* ``<think>...</think>`` blocks go to the reasoning channel (``reasoning = "separate"``), are
  dropped (``"strip"``) or stay in the content (``"inline"``);
* stop strings end the content at their first occurrence; no part of a stop string is ever
  emitted, so text that could still become a stop string is held back until it cannot.
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


@dataclass
class Piece:
    """What one call produced: new content text, new reasoning text, whether a stop hit."""

    content: str = ""
    reasoning: str = ""
    stopped: bool = False


def _held_prefix(text: str, patterns: list[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some pattern."""
    best = 0
    for pattern in patterns:
        for n in range(min(len(pattern) - 1, len(text)), best, -1):
            if text.endswith(pattern[:n]):
                best = n
                break
    return best


class TextFilter:
    """Stateful splitter for one generation. Feed pieces, then ``finish()``."""

    def __init__(self, *, stop: list[str], reasoning: str, in_think: bool = False) -> None:
        self._stop = [s for s in stop if s]
        self._mode = reasoning
        self._in_think = in_think and reasoning != "inline"
        self._pending = ""  # text not yet classified (could be a tag or a stop prefix)
        self._stopped = False
        self._after_think = False
        self.matched: str | None = None  # the stop string that ended the content, if one did

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def in_think(self) -> bool:
        """Inside a ``<think>`` block (separate or strip mode): the engine counts such
        decoding steps as reasoning tokens."""
        return self._in_think

    def feed(self, text: str) -> Piece:
        """Classify as much of ``text`` (plus held-back text) as can be decided now."""
        if self._stopped:
            return Piece(stopped=True)
        self._pending += text
        return self._drain(final=False)

    def finish(self) -> Piece:
        """End of generation: release everything still held back."""
        if self._stopped:
            return Piece(stopped=True)
        return self._drain(final=True)

    def _drain(self, *, final: bool) -> Piece:
        out = Piece()
        while self._pending:
            if self._in_think:
                idx = self._pending.find(THINK_CLOSE)
                if idx >= 0:
                    self._emit_reasoning(out, self._pending[:idx])
                    self._pending = self._pending[idx + len(THINK_CLOSE) :]
                    self._in_think = False
                    self._after_think = True
                    continue
                keep = 0 if final else _held_prefix(self._pending, [THINK_CLOSE])
                self._emit_reasoning(out, self._pending[: len(self._pending) - keep])
                self._pending = self._pending[len(self._pending) - keep :]
                break
            if self._after_think:
                # Models put a newline or two after </think>; they are not content.
                self._pending = self._pending.lstrip("\n")
                if not self._pending:
                    break
                self._after_think = False
            # Content mode: look for the earliest of a stop string or an opening tag.
            cut, kind, hit = len(self._pending), "", ""
            for s in self._stop:
                i = self._pending.find(s)
                if 0 <= i < cut:
                    cut, kind, hit = i, "stop", s
            if self._mode != "inline":
                i = self._pending.find(THINK_OPEN)
                if 0 <= i < cut:
                    cut, kind = i, "think"
            if kind == "stop":
                out.content += self._pending[:cut]
                self._pending = ""
                self._stopped = out.stopped = True
                self.matched = hit
                break
            if kind == "think":
                out.content += self._pending[:cut]
                self._pending = self._pending[cut + len(THINK_OPEN) :]
                self._in_think = True
                continue
            patterns = list(self._stop)
            if self._mode != "inline":
                patterns.append(THINK_OPEN)
            keep = 0 if final else _held_prefix(self._pending, patterns)
            out.content += self._pending[: len(self._pending) - keep]
            self._pending = self._pending[len(self._pending) - keep :]
            break
        return out

    def _emit_reasoning(self, out: Piece, text: str) -> None:
        if self._mode == "separate":
            out.reasoning += text
