"""``POST /v1/embeddings``: vectors for RAG apps and vector stores.

The loaded causal LM serves them: mean-pooled, L2-normalised final hidden states (see
:mod:`mlxd.engine.embed`), computed on the engine thread in length-sorted batches between
decode steps. ``dimensions`` keeps the first components and normalises again (what OpenAI's
``text-embedding-3`` models do); ``base64`` is the little-endian float32 bytes the OpenAI SDK
asks for by default.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator
from quart import Blueprint, Response, jsonify

from ..engine.loader import LoadedModel
from ..errors import BadRequest
from ..prompt import RawPrompts, token_lists
from .context import json_body, record, state
from .params import parse
from .routing import model_for

bp = Blueprint("embeddings", __name__)

#: OpenAI's own bound on inputs per request.
MAX_INPUTS = 2048

InputField = RawPrompts


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: InputField
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _inputs(cls, v: InputField) -> InputField:
        if isinstance(v, list) and not v:
            raise ValueError("must be a string, a list of strings or token ids, not empty")
        if isinstance(v, list) and not isinstance(v[0], int) and len(v) > MAX_INPUTS:
            raise ValueError(f"at most {MAX_INPUTS} inputs per request (got {len(v)})")
        return v


def _token_ids(lm: LoadedModel, value: RawPrompts) -> list[list[int]]:
    return token_lists(lm, value, param="input", room=0)


def encode(vectors: np.ndarray, dimensions: int | None, fmt: str) -> list[Any]:
    """Rows as the wire wants them: cut to ``dimensions`` and renormalised, then floats or
    base64 of little-endian float32."""
    if dimensions is not None:
        vectors = vectors[:, :dimensions]
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
    vectors = vectors.astype("<f4")
    if fmt == "base64":
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in vectors]
    return [row.tolist() for row in vectors]


@bp.post("/v1/embeddings")
async def embeddings() -> Response:
    st = state()
    rec = record()
    req = parse(EmbeddingRequest, await json_body())
    lm = await model_for(st, rec, req.model)
    width = int(lm.config.get("hidden_size", 0))
    if req.dimensions is not None and width and req.dimensions > width:
        raise BadRequest(
            f"dimensions {req.dimensions} is above this model's embedding size ({width})",
            param="dimensions",
            code="invalid_value",
        )
    inputs = await asyncio.to_thread(_token_ids, lm, req.input)
    rec.model = lm.id
    rec.prompt_tokens = sum(len(ids) for ids in inputs)
    vectors = await asyncio.wrap_future(st.engine.embed(lm, inputs))
    data = await asyncio.to_thread(encode, vectors, req.dimensions, req.encoding_format)
    return jsonify(
        {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(data)
            ],
            "model": lm.id,
            "usage": {"prompt_tokens": rec.prompt_tokens, "total_tokens": rec.prompt_tokens},
        }
    )
