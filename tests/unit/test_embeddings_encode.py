"""Embedding rows on the wire: ``dimensions`` truncates and renormalises; base64 is float32."""

from __future__ import annotations

import base64

import numpy as np

from mlxd.api.embeddings import encode


def test_dimensions_truncate_and_renormalise() -> None:
    """The first k components, scaled back to unit length."""
    rows = np.array([[0.6, 0.8, 0.0], [0.0, 0.6, 0.8]], dtype=np.float32)
    out = encode(rows, 2, "float")
    assert np.allclose(out[0], [0.6, 0.8])
    assert np.allclose(out[1], [0.0, 1.0])


def test_base64_is_little_endian_float32_of_the_floats() -> None:
    """Decoding the base64 gives exactly the float rows."""
    rows = np.array([[0.6, 0.8]], dtype=np.float32)
    (b64,) = encode(rows, None, "base64")
    decoded = np.frombuffer(base64.b64decode(b64), dtype="<f4")
    assert decoded.tolist() == encode(rows, None, "float")[0]
