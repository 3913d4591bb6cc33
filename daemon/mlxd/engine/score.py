"""Prompt scoring: the logprob of every prompt token given the ones before it (engine thread).

What the completions API's ``echo`` with ``logprobs`` returns for the prompt, and what
evaluation harnesses (lm-evaluation-harness ``loglikelihood``) ask for. The prompt runs
through the model in chunks on a plain KV cache, one chunk per :meth:`ScoreTask.step`, so
the engine thread decodes between chunks. The distribution is the model's own: no
repetition penalty or grammar applies to a prompt.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, InvalidStateError
from typing import Any, cast

import mlx.core as mx

from .loader import LoadedModel
from .protocol import TokenLogprob

#: Prompt tokens per forward pass: bounds the (tokens x vocabulary) logprob matrix.
CHUNK_TOKENS = 256


class ScoreTask:
    """Score ``prompt`` with ``lm``: the future gets one :class:`TokenLogprob` per prompt
    token after the first (with ``k`` alternatives each)."""

    def __init__(
        self, lm: LoadedModel, prompt: list[int], k: int, future: Future[list[TokenLogprob]]
    ) -> None:
        from mlx_lm.models.cache import make_prompt_cache

        self.lm = lm
        self.prompt = prompt
        self.k = k
        self.future = future
        self._cache: Any = make_prompt_cache(lm.model)
        self._done = 0  # prompt tokens fed so far
        self._out: list[TokenLogprob] = []

    def step(self) -> bool:
        """Feed the next chunk; True once the whole prompt is scored and the future set."""
        if self.future.cancelled():
            return True
        start = self._done
        end = min(start + CHUNK_TOKENS, len(self.prompt) - 1)
        if end > start:
            ids = mx.array(self.prompt[start:end])[None]
            logits = self.lm.model(ids, cache=self._cache)[0].astype(mx.float32)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            targets = mx.array(self.prompt[start + 1 : end + 1])
            chosen = mx.take_along_axis(logprobs, targets[:, None], axis=-1)[:, 0]
            top_ids: list[list[int]] = []
            top_values: list[list[float]] = []
            if self.k:
                best = mx.argpartition(-logprobs, kth=self.k - 1, axis=-1)[:, : self.k]
                top_ids = cast(list[list[int]], best.tolist())
                top_values = cast(
                    list[list[float]], mx.take_along_axis(logprobs, best, axis=-1).tolist()
                )
            values = cast(list[float], chosen.tolist())
            for row, token in enumerate(self.prompt[start + 1 : end + 1]):
                top: tuple[tuple[int, float], ...] = ()
                if self.k:
                    pairs = zip(top_ids[row], top_values[row], strict=True)
                    top = tuple(sorted(pairs, key=lambda t: -t[1]))
                self._out.append(TokenLogprob(token, float(values[row]), top))
            self._done = end
        if self._done < len(self.prompt) - 1:
            return False
        with contextlib.suppress(InvalidStateError):  # cancelled meanwhile: nobody waits
            self.future.set_result(self._out)
        return True
