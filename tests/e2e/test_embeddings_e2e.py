"""Embeddings from the bundled causal LM against the real daemon, through the OpenAI SDK."""

from __future__ import annotations

import base64
import math
import struct
from typing import Any

import httpx2 as httpx
import openai
import pytest

from conftest import assert_openai_error


def _cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def test_similar_sentences_are_closer(client: openai.OpenAI) -> None:
    """Two sentences about a cat on a mat are closer than either is to one about markets;
    every vector has unit length; usage counts the input tokens."""
    resp = client.embeddings.create(
        model="m",
        input=[
            "The cat sat on the mat",
            "A cat was sitting on a mat",
            "Stock markets fell sharply today",
        ],
        encoding_format="float",
    )
    cat, cat2, stocks = (d.embedding for d in sorted(resp.data, key=lambda d: d.index))
    assert _cos(cat, cat2) > _cos(cat, stocks)
    assert all(abs(math.sqrt(_cos(v, v)) - 1) < 1e-4 for v in (cat, cat2, stocks))
    assert resp.usage.prompt_tokens == resp.usage.total_tokens > 10


def test_base64_and_dimensions(client: openai.OpenAI, http: httpx.Client) -> None:
    """base64 is the same float32 values; ``dimensions: 64`` gives unit vectors of 64; the
    SDK's default (base64, decoded by the SDK) gives the same floats; token ids work."""
    text = "The cat sat on the mat"
    floats = http.post("/v1/embeddings", json={"input": text}).json()["data"][0]["embedding"]
    b64 = http.post("/v1/embeddings", json={"input": text, "encoding_format": "base64"}).json()
    raw = base64.b64decode(b64["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert (
        len(decoded) == len(floats)
        and max(abs(a - b) for a, b in zip(decoded, floats, strict=True)) < 1e-6
    )
    sdk = client.embeddings.create(model="m", input=text).data[0].embedding
    assert max(abs(a - b) for a, b in zip(sdk, floats, strict=True)) < 1e-6
    short = client.embeddings.create(model="m", input=[text, "hello"], dimensions=64)
    for d in short.data:
        assert len(d.embedding) == 64
        assert abs(math.sqrt(_cos(d.embedding, d.embedding)) - 1) < 1e-4
    ids = client.embeddings.create(model="m", input=[[504, 2767, 3130], [504, 2767, 3130]])
    assert _cos(ids.data[0].embedding, ids.data[1].embedding) > 0.9999


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": []}, "input"),
        ({"input": ["hello"] * 10_000}, "input"),
        ({"input": ["hello", ""]}, "input[1]"),
        ({"input": "hello", "dimensions": 0}, "dimensions"),
        ({"input": "hello", "dimensions": 100_000}, "dimensions"),
        ({"input": "hello", "encoding_format": "int8"}, "encoding_format"),
        ({"input": [[1, 2], [10**9]]}, "input[1]"),
        ({"input": "word " * 9000}, "input"),
        ({}, "input"),
    ],
)
def test_bad_embedding_requests_are_400(
    http: httpx.Client, body: dict[str, Any], param: str
) -> None:
    """Empty or too many inputs, an input over the context, and bad dimensions or formats are
    400s naming the parameter (the context error names the limit)."""
    err = assert_openai_error(http.post("/v1/embeddings", json=body), 400)
    assert err["param"] == param
    if "word" in str(body.get("input", "")):
        assert err["code"] == "context_length_exceeded" and "8192" in err["message"]
