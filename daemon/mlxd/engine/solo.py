"""One sequence on a plain KV cache, stepped the way mlx-lm's ``generate_step`` steps it.

Most requests to a local daemon arrive alone. ``BatchGenerator`` holding one sequence still
pays for a batch: a padded ``BatchKVCache`` with its masks, per-row logprob splits, a
host copy of the whole batch every step. A :class:`SoloSequence` pays for none of it: a
plain cache, one forward per token, and one step always in flight on the device
(``mx.async_eval``) while the host turns the previous token into text.

The batch runner (:mod:`mlxd.engine.batch`) runs a sequence here while it is the only one,
hands it to its ``BatchGenerator`` when a second request arrives (:meth:`handoff`) and takes
it back when it is alone again (:meth:`from_batch`). Both sides keep the same invariant, so
a handoff changes no token: the cache holds exactly ``tokens``; ``pending`` is the next
token, sampled but not yet fed to the model nor shown to the client.
"""

from __future__ import annotations

from typing import Any

from .protocol import LogitsProcessor


class SoloSequence:
    """Prefill (one chunk per :meth:`step`) and decode of one sequence. Engine thread only."""

    def __init__(
        self,
        model: Any,
        cache: list[Any],
        tokens: list[int],
        remaining: list[int],
        sampler: Any,
        processors: list[LogitsProcessor],
        prefill_step_size: int,
    ) -> None:
        self.model = model
        self.cache = cache
        self.tokens = tokens  # exactly what the cache holds
        self.remaining = remaining  # prompt tokens not yet in the cache
        self.pending: Any = None  # mx.array of shape (1,): next token, not yet in the cache
        self.sampler = sampler
        self.processors = processors
        self.prefill_step_size = prefill_step_size
        self._context: Any = None  # tokens as an mx.array, kept only for processors

    @classmethod
    def from_batch(
        cls,
        model: Any,
        cache: list[Any],
        tokens: list[int],
        pending: Any,
        sampler: Any,
        processors: list[LogitsProcessor],
        prefill_step_size: int,
    ) -> SoloSequence:
        """A sequence leaving a batch: its extracted cache, its tokens, and the token the
        batch already sampled for it."""
        solo = cls(model, cache, tokens, [], sampler, processors, prefill_step_size)
        solo.pending = pending
        return solo

    @property
    def prefilling(self) -> bool:
        return self.pending is None

    def prefill_chunk(self) -> None:
        """Feed the prompt tokens up to the next multiple of ``prefill_step_size`` positions
        (a full chunk when the cache starts empty); the last prompt token is fed by the
        forward that samples the first new token.

        Chunks end at fixed positions whatever prefix the prompt cache supplied: on a GPU a
        chunk of a new shape (length and cache offset) costs setup time on first use
        (measured on the H200 with MLX's CUDA backend, docs/engine.md), and a reused prefix
        of any length would otherwise move every chunk of the prompt to new offsets."""
        import mlx.core as mx

        step = self.prefill_step_size
        n = min(step - len(self.tokens) % step, len(self.remaining) - 1)
        if n > 0:
            chunk, self.remaining = self.remaining[:n], self.remaining[n:]
            self.model(mx.array(chunk)[None], cache=self.cache)
            mx.eval([c.state for c in self.cache])
            self.tokens += chunk
            return
        last = mx.array(self.remaining)
        self.pending = self._forward(last)
        self.tokens += self.remaining
        self.remaining = []
        _async_eval(self.pending)

    def decode(self, more: bool) -> int:
        """The pending token as an int; with ``more``, the step after it is already queued
        on the device before the host waits for this one."""

        current = self.pending
        if more:
            self.pending = self._forward(current)
            _async_eval(self.pending)
        token = int(current.item())
        if more:
            self.tokens.append(token)  # fed by the step just queued
        else:
            self.pending = None  # the last token: never fed, so not in the cache
        return token

    def _forward(self, inputs: Any) -> Any:
        import mlx.core as mx

        logits = self.model(inputs[None], cache=self.cache)[:, -1, :]
        if self.processors:
            if self._context is None:
                self._context = mx.array(self.tokens, dtype=inputs.dtype)
            self._context = mx.concatenate([self._context, inputs])
            for processor in self.processors:
                logits = processor(self._context, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return self.sampler(logprobs)

    def handoff(self) -> tuple[list[Any], list[int], list[int]]:
        """What a ``BatchGenerator.insert`` needs to carry on: the cache, the tokens it
        holds, and the tokens still to feed (the rest of the prompt, or the pending token
        once the caller has shown it to the client)."""
        if self.prefilling:
            return self.cache, self.tokens, self.remaining
        return self.cache, self.tokens, [int(self.pending.item())]


def _async_eval(array: Any) -> None:
    """Queue ``array``'s computation on the device and return at once."""
    import mlx.core as mx

    start: Any = mx.async_eval  # its stub has no annotations
    start(array)
