"""Text embeddings from a causal language model (runs on the engine thread only).

A causal LM has no pooling head, so an input's embedding is the mean of its final hidden
states (after the model's last norm) over its tokens, L2-normalised. Mean pooling rather than
the last token: with causal attention the last position sees the whole text, but its state
is trained to predict the next token, and for small models the mean is the better similarity
signal (the usual choice for decoder-only models without an embedding fine-tune).

Inputs are run in batches padded on the right: causal attention means a real position never
sees the padding after it, so no mask is needed, and the padded positions are left out of the
mean. Batches are sorted by length so that little is padded, and bounded in padded tokens.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, InvalidStateError
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import BadRequest
from .loader import LoadedModel

#: Padded tokens per forward pass (rows x longest row): bounds the activations of one batch.
BATCH_TOKENS = 4096


def hidden_model(lm: LoadedModel) -> Any:
    """The model's inner transformer that returns final hidden states, or a 400."""
    inner = getattr(lm.model, "model", None)
    if inner is None or not callable(inner):
        raise BadRequest(
            f"model {lm.id!r} does not expose its hidden states; embeddings need a model "
            "whose mlx-lm class has an inner .model (Llama, Qwen, Mistral, Gemma, ...)",
            code="unsupported_model",
        )
    return inner


class EmbedTask:
    """One embeddings request: its inputs, run one batch per :meth:`step` so that the engine
    thread can decode between batches; the result (one unit-length float32 row per input)
    goes to ``future``."""

    def __init__(self, lm: LoadedModel, inputs: list[list[int]], future: Future[np.ndarray]):
        self.lm = lm
        self.inputs = inputs
        self.future = future
        self._order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        self._rows: list[np.ndarray | None] = [None] * len(inputs)
        self._next = 0

    def step(self) -> bool:
        """Embed the next batch; True once every input is done and the future is set."""
        if self.future.cancelled():
            return True
        inner = hidden_model(self.lm)
        order, start = self._order, self._next
        end = start + 1
        while end < len(order) and (end - start + 1) * len(self.inputs[order[end]]) <= BATCH_TOKENS:
            end += 1
        batch = [self.inputs[i] for i in order[start:end]]
        longest = len(batch[-1])
        ids = mx.array([row + [0] * (longest - len(row)) for row in batch])
        lengths = mx.array([len(row) for row in batch], dtype=mx.float32)
        hidden = inner(ids).astype(mx.float32)
        mask = (mx.arange(longest)[None, :] < lengths[:, None]).astype(mx.float32)
        mean = (hidden * mask[..., None]).sum(axis=1) / lengths[:, None]
        unit = mean / mx.maximum(mx.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)
        values = np.array(unit, dtype=np.float32)
        for k, i in enumerate(order[start:end]):
            self._rows[i] = values[k]
        self._next = end
        if end < len(order):
            return False
        # The request may have been cancelled meanwhile (its client left): nobody waits.
        with contextlib.suppress(InvalidStateError):
            self.future.set_result(np.stack([row for row in self._rows if row is not None]))
        return True
