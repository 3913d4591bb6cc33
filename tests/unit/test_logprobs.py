"""Token ids to the text and bytes logprobs show, and the completions API's legacy shape."""

from __future__ import annotations

from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer

from mlxd.api.logprobs import Alternative, Entry, TokenText, legacy
from mlxd.engine.protocol import TokenLogprob


class FakeTokenizer:
    """The two calls TokenText makes, over a fixed vocabulary."""

    def __init__(self, pieces: list[str], detokenizer: type) -> None:
        self.pieces = pieces
        self._detokenizer = detokenizer.__new__(detokenizer)

    def convert_ids_to_tokens(self, token_id: int) -> str:
        return self.pieces[token_id]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.pieces[i] for i in ids)


def test_byte_level_bpe_tokens_and_partial_characters() -> None:
    """GPT-2 style pieces map back to their bytes (Ġ is a space); half a UTF-8 character is
    shown as ``bytes:`` escapes, with its raw bytes."""
    texts = TokenText(FakeTokenizer(["ĠParis", "âĢ", "hi"], BPEStreamingDetokenizer))
    assert texts.token(0) == (" Paris", tuple(b" Paris"))
    assert texts.token(1) == ("bytes:\\xe2\\x80", (0xE2, 0x80))
    entry = texts.entry(TokenLogprob(0, -0.5, ((0, -0.5), (2, -1.5))))
    assert entry.wire() == {
        "token": " Paris",
        "logprob": -0.5,
        "bytes": list(b" Paris"),
        "top_logprobs": [
            {"token": " Paris", "logprob": -0.5, "bytes": list(b" Paris")},
            {"token": "hi", "logprob": -1.5, "bytes": list(b"hi")},
        ],
    }


def test_sentencepiece_spaces_and_byte_tokens() -> None:
    """SentencePiece's ▁ is a space and <0xNN> is one raw byte."""
    texts = TokenText(FakeTokenizer(["\u2581Paris", "<0x0A>"], SPMStreamingDetokenizer))
    assert texts.token(0) == (" Paris", tuple(b" Paris"))
    assert texts.token(1) == ("\n", (10,))


def test_legacy_shape_offsets_follow_the_text() -> None:
    """Parallel lists; alternatives as {token: logprob}; offsets start where the text does."""
    entries = [
        Entry(" Paris", tuple(b" Paris"), -0.2, (Alternative(" Paris", (), -0.2),)),
        Entry(".", (46,), -0.4, ()),
    ]
    assert legacy(entries, 10) == {
        "tokens": [" Paris", "."],
        "token_logprobs": [-0.2, -0.4],
        "top_logprobs": [{" Paris": -0.2}, {}],
        "text_offset": [10, 16],
    }
