"""Chat Completions stream frames: the per-token fast frame is byte for byte the frame the
general path builds (clients parse these bytes; the fast path must not change one)."""

from __future__ import annotations

import json

import pytest

from mlxd.api.chat import _ChunkRenderer, _Head
from mlxd.api.logprobs import Entry, Logprobs
from mlxd.api.pipeline import Choice
from mlxd.api.tools import Text

TEXTS = [
    "Hello",
    " world",
    "",
    'quote " and \\ backslash',
    "line\nbreak\ttab",
    "é ü 中文 🙂",
    "\x00\x1f control",
    "</s>",
    "\u2028 separator",
]


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("index", [0, 1])
def test_text_frame_equals_the_general_frame(include_usage: bool, index: int) -> None:
    head = _Head("chatcmpl-abc", 1_700_000_000, 'model "x" / é')
    fast = _ChunkRenderer(head, include_usage, choices=2)
    general = _ChunkRenderer(head, include_usage, choices=2)
    for text in TEXTS:
        (frame,) = fast.piece(Choice(index, Text(text)))
        assert frame == general._frame(index, {"content": text})
        payload = json.loads(frame.removeprefix(b"data: "))
        assert payload["choices"][0]["delta"] == {"content": text}
        assert payload["choices"][0]["index"] == index


def test_pending_logprobs_go_on_the_next_text_frame() -> None:
    """A text piece after logprobs takes the general path and carries them."""
    r = _ChunkRenderer(_Head("c", 1, "m"), False)
    entry = Entry("Hi", (72, 105), -0.5, ())
    assert r.piece(Choice(0, Logprobs((entry,)))) == []
    (frame,) = r.piece(Choice(0, Text("Hi")))
    choice = json.loads(frame.removeprefix(b"data: "))["choices"][0]
    assert choice["logprobs"]["content"][0]["token"] == "Hi"
    (plain,) = r.piece(Choice(0, Text("!")))
    assert json.loads(plain.removeprefix(b"data: "))["choices"][0]["logprobs"] is None
