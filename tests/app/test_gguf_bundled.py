"""The bundled SmolLM2 GGUF through mlxd.models.gguf: it answers, keeps each tensor's
quantization, has an HF-style config and a faithful tokenizer, and exports to a directory
mlx_lm loads with the same output. (tests/unit/test_gguf.py: the same code on tiny synthetic
files and broken ones, without the real model.)

The bundled model is loaded once per module per mode; every test doing MLX work runs on
pytest's main thread, the thread that loaded it (MLX streams are thread-local).
"""

from __future__ import annotations

from mlxd.backend import preload_blas

# Before mlx is first imported: the float32 model runs ~30x faster on OpenBLAS (a no-op if
# another test module imported mlx first, or on macOS).
preload_blas()

import json  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import pytest  # noqa: E402
from mlx_lm import load as mlx_lm_load  # noqa: E402
from mlx_lm import stream_generate  # noqa: E402
from mlx_lm.sample_utils import make_sampler  # noqa: E402
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer  # noqa: E402

from mlxd.models import gguf  # noqa: E402

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# Raw (untemplated) prompt for the export comparisons: short, so prefill stays cheap.
SHORT_PROMPT = "The capital of France is"
TRICKY_TEXT = (
    "Café déjà vu — naïve façade 😀🇫🇷 two  spaces,   three\n\nnew lines\tand a tab, "
    "year 2024, Ω≈ç√ 日本語!  \n end"
)

Loaded = tuple[nn.Module, Any, dict[str, Any]]


@pytest.fixture(scope="module")
def bundled() -> Path:
    return gguf.bundled_gguf_path()


@pytest.fixture(scope="module")
def quantized(bundled: Path) -> Loaded:
    return gguf.load_gguf(bundled)


@pytest.fixture(scope="module")
def dequantized(bundled: Path) -> Loaded:
    return gguf.load_gguf(bundled, dequantize=mx.float32)


def greedy(
    model: nn.Module, tokenizer: Any, prompt: str | list[int], max_tokens: int
) -> tuple[list[int], str]:
    tokens: list[int] = []
    text = ""
    for response in stream_generate(
        model, tokenizer, prompt, max_tokens=max_tokens, sampler=make_sampler(temp=0.0)
    ):
        tokens.append(response.token)
        text += response.text
    return tokens, text


def _flat(tree: Any) -> list[tuple[str, mx.array]]:
    from mlx.utils import tree_flatten

    return list(tree_flatten(tree))


# ---------------------------------------------------------------------------------------------
# The bundled model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["quantized", "dequantized"])
def test_bundled_model_answers_paris(mode: str, request: pytest.FixtureRequest) -> None:
    """Greedy decoding of the chat-templated question says Paris and stops at <|im_end|>.

    Pins the q/k un-permutation (without it the model babbles), the tokenizer and chat
    template, the eos ids, and for the quantized mode the per-tensor bits.
    """
    model, tokenizer, _ = request.getfixturevalue(mode)
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    tokens, text = greedy(model, tokenizer, prompt, max_tokens=20)
    assert "Paris" in text, text
    assert tokens[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_quantized_model_keeps_per_tensor_bits(quantized: Loaded) -> None:
    """dequantize=None keeps Q4_1 layers at 4 bits and the Q8_0 embedding at 8 bits."""
    model, _, _ = quantized
    embed = model.model.embed_tokens
    assert isinstance(embed, nn.QuantizedEmbedding)
    assert (embed.bits, embed.group_size) == (8, 32)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, nn.QuantizedLinear)
    assert (q_proj.bits, q_proj.group_size) == (4, 32)


def test_dequantized_model_is_all_float32(dequantized: Loaded) -> None:
    """dequantize=mx.float32 leaves no quantized module and no other dtype."""
    model, _, _ = dequantized
    assert not any(
        isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding) for m in model.modules()
    )
    assert {a.dtype for _, a in _flat(model.parameters())} == {mx.float32}


def test_config_is_hf_style(quantized: Loaded) -> None:
    """The config carries HF llama names and values (context length, eps written cleanly)."""
    _, tokenizer, config = quantized
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"]) == (576, 30)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["max_position_embeddings"] == 8192
    assert config["tie_word_embeddings"] is True
    assert config["rms_norm_eps"] == 1e-5
    assert config["rope_theta"] == 100000.0
    assert config["vocab_size"] == 49152
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in config["eos_token_id"]
    assert im_end in tokenizer.eos_token_ids
    assert config["quantization"]["model.embed_tokens"]["bits"] == 8
    assert config["quantization"]["model.layers.0.mlp.down_proj"]["bits"] == 4


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def test_control_tokens_encode_as_one_id(quantized: Loaded) -> None:
    """<|im_start|> and <|im_end|> are single special ids, not spelled out in BPE pieces."""
    _, tokenizer, _ = quantized
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>") == 1
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_digits_are_split_one_by_one(quantized: Loaded) -> None:
    """The smollm pre-tokenizer splits each digit on its own: "2024" is four tokens."""
    _, tokenizer, _ = quantized
    ids = tokenizer.encode("2024", add_special_tokens=False)
    assert [tokenizer.decode([i]) for i in ids] == ["2", "0", "2", "4"]


def test_round_trip_and_streaming_decode(quantized: Loaded) -> None:
    """Accents, emoji, runs of spaces, newlines and tabs survive encode/decode, and the
    streaming detokenizer fed one id at a time yields exactly the same text."""
    _, tokenizer, _ = quantized
    ids = tokenizer.encode(TRICKY_TEXT, add_special_tokens=False)
    assert tokenizer.decode(ids) == TRICKY_TEXT
    detokenizer = tokenizer.detokenizer
    assert isinstance(detokenizer, BPEStreamingDetokenizer)
    pieces = []
    for token in ids:
        detokenizer.add_token(token)
        piece = detokenizer.last_segment
        assert "\ufffd" not in piece  # never a half of a multi-byte character
        pieces.append(piece)
    detokenizer.finalize()
    pieces.append(detokenizer.last_segment)
    assert "".join(pieces) == TRICKY_TEXT
    assert detokenizer.text == TRICKY_TEXT


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["quantized", "dequantized"])
def test_export_round_trip(
    mode: str, bundled: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """mlx_lm.load of the exported directory decodes the same greedy tokens as the GGUF
    model, encodes text identically, and the export leaves no temporary directory behind."""
    model, tokenizer, _ = request.getfixturevalue(mode)
    dtype = None if mode == "quantized" else mx.float32
    out = gguf.export_mlx_dir(bundled, tmp_path / "model", dequantize=dtype)

    assert out == tmp_path / "model"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert {p.name for p in out.iterdir()} == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    }
    config = json.loads((out / "config.json").read_text())
    assert ("quantization" in config) == (mode == "quantized")
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert "<|im_end|>" in tokenizer_config["chat_template"]
    assert tokenizer_config["eos_token"] == "<|im_end|>"

    exported_model, exported_tokenizer = mlx_lm_load(str(out))[:2]
    assert isinstance(exported_tokenizer.detokenizer, BPEStreamingDetokenizer)
    assert exported_tokenizer.eos_token_ids == tokenizer.eos_token_ids
    ids = tokenizer.encode(TRICKY_TEXT, add_special_tokens=False)
    assert exported_tokenizer.encode(TRICKY_TEXT, add_special_tokens=False) == ids

    prompt = tokenizer.encode(SHORT_PROMPT, add_special_tokens=False)
    expected, _ = greedy(model, tokenizer, prompt, max_tokens=4)
    actual, _ = greedy(exported_model, exported_tokenizer, prompt, max_tokens=4)
    assert actual == expected
