"""The byte-level BPE tokenizer of a GGUF file (vocab, merges, pre-tokenizer, special tokens,
chat template), rebuilt as a ``tokenizers`` / ``transformers`` tokenizer in mlx_lm's
``TokenizerWrapper``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlxd.errors import UnsupportedModelError

from .reader import meta_value

if TYPE_CHECKING:
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from tokenizers import Tokenizer

SUPPORTED_TOKENIZER_MODELS = ("gpt2",)

# llama.cpp pre-tokenizer names (``tokenizer.ggml.pre``) and the regex split that runs before
# the GPT-2 byte-level split. The "smollm" family splits every digit on its own (llama.cpp
# groups starcoder, refact, codeshell and smollm under the same regex); "gpt-2" is the plain
# GPT-2 regex.
_DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "codeshell")
_PLAIN_PRE = ("gpt-2", "gpt2")
SUPPORTED_PRE_TOKENIZERS = _DIGIT_SPLIT_PRE + _PLAIN_PRE

# GGUF token types (llama.cpp llama_token_type).
_TOKEN_UNKNOWN = 2
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# The split the "smollm" family runs before the GPT-2 regex of ByteLevel(use_regex=True).
_DIGIT_REGEX = r"\p{N}"
_END_OF_TURN = "<|im_end|>"


@dataclass
class TokenizerSpec:
    """Everything needed to build the tokenizer objects or write the tokenizer files."""

    backend: Tokenizer
    bos_token: str | None
    eos_token: str | None
    unk_token: str | None
    pad_token: str | None
    bos_token_id: int | None
    eos_token_ids: list[int]
    pad_token_id: int | None
    chat_template: str | None
    add_bos_token: bool
    special_tokens: list[str]
    model_max_length: int


def tokenizer_spec(path: Path, metadata: dict[str, Any], config: dict[str, Any]) -> TokenizerSpec:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing

    model = metadata.get("tokenizer.ggml.model")
    if model not in SUPPORTED_TOKENIZER_MODELS:
        raise UnsupportedModelError(
            f"{path}: GGUF tokenizer model {model!r} is not supported "
            "(supported: 'gpt2', byte-level BPE)"
        )
    pre = metadata.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in SUPPORTED_PRE_TOKENIZERS:
        raise UnsupportedModelError(
            f"{path}: GGUF pre-tokenizer {pre!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_PRE_TOKENIZERS)})"
        )
    tokens = metadata.get("tokenizer.ggml.tokens")
    merges = metadata.get("tokenizer.ggml.merges")
    if not isinstance(tokens, list) or not isinstance(merges, list):
        raise UnsupportedModelError(
            f"{path}: GGUF BPE tokenizer lacks 'tokenizer.ggml.tokens' or 'tokenizer.ggml.merges'"
        )
    if len(tokens) > config["vocab_size"]:
        raise UnsupportedModelError(
            f"{path}: tokenizer has {len(tokens)} tokens but the embedding only "
            f"{config['vocab_size']} rows"
        )
    token_types = meta_value(metadata, "tokenizer.ggml.token_type") or []

    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    backend = Tokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(
        add_prefix_space=bool(meta_value(metadata, "tokenizer.ggml.add_space_prefix")),
        use_regex=True,
    )
    if pre in _DIGIT_SPLIT_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_DIGIT_REGEX), "isolated"), byte_level]
        )
    else:
        backend.pre_tokenizer = byte_level
    # A ByteLevel decoder is also what makes mlx_lm.load pick BPEStreamingDetokenizer.
    backend.decoder = decoders.ByteLevel()

    # Control tokens were special in the HF tokenizer the file came from; user-defined ones
    # were added non-special tokens. Both must match whole, so "<|im_start|>" is one id.
    special = [
        tokens[i]
        for i, t in enumerate(token_types)
        if t in (_TOKEN_CONTROL, _TOKEN_UNKNOWN) and i < len(tokens)
    ]
    user = [tokens[i] for i, t in enumerate(token_types) if t == _TOKEN_USER_DEFINED]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    if user:
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

    def token_id(key: str) -> int | None:
        value = meta_value(metadata, f"tokenizer.ggml.{key}")
        return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

    bos_id, eos_id = token_id("bos_token_id"), token_id("eos_token_id")
    unk_id, pad_id = token_id("unknown_token_id"), token_id("padding_token_id")
    add_bos = bool(meta_value(metadata, "tokenizer.ggml.add_bos_token")) and bos_id is not None
    if add_bos and bos_id is not None:
        bos = tokens[bos_id]
        backend.post_processor = TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, bos_id)],
        )

    template = metadata.get("tokenizer.chat_template")
    chat_template = template if isinstance(template, str) else None
    # Stop at the end of a turn as well as at the declared eos: chat-tuned files often
    # declare <|endoftext|> as eos while their template ends each turn with <|im_end|>.
    candidates = [eos_id, token_id("eot_token_id")]
    if chat_template is not None and _END_OF_TURN in chat_template:
        candidates.append(vocab.get(_END_OF_TURN))
    eos_ids: list[int] = []
    for candidate in candidates:
        if candidate is not None and candidate not in eos_ids:
            eos_ids.append(candidate)

    def token(i: int | None) -> str | None:
        return None if i is None else tokens[i]

    return TokenizerSpec(
        backend=backend,
        bos_token=token(bos_id),
        eos_token=token(eos_ids[0] if eos_ids else None),
        unk_token=token(unk_id),
        pad_token=token(pad_id),
        bos_token_id=bos_id,
        eos_token_ids=eos_ids,
        pad_token_id=pad_id,
        chat_template=chat_template,
        add_bos_token=add_bos,
        special_tokens=special,
        model_max_length=int(config["max_position_embeddings"]),
    )


def special_tokens_map(spec: TokenizerSpec) -> dict[str, Any]:
    named = {
        "bos_token": spec.bos_token,
        "eos_token": spec.eos_token,
        "unk_token": spec.unk_token,
        "pad_token": spec.pad_token,
    }
    result: dict[str, Any] = {k: v for k, v in named.items() if v is not None}
    extra = [t for t in spec.special_tokens if t not in result.values()]
    if extra:
        result["additional_special_tokens"] = extra
    return result


def wrap_tokenizer(spec: TokenizerSpec) -> TokenizerWrapper:
    from mlx_lm import tokenizer_utils
    from transformers import PreTrainedTokenizerFast

    special = special_tokens_map(spec)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=spec.backend,
        chat_template=spec.chat_template,
        clean_up_tokenization_spaces=False,
        model_max_length=spec.model_max_length,
        add_bos_token=spec.add_bos_token,
        add_eos_token=False,
        **special,
    )
    # mlx_lm.load infers a tool-call parser from the chat template; do the same so a GGUF
    # model and its exported directory behave alike. The helper is private, hence optional.
    infer = getattr(tokenizer_utils, "_infer_tool_parser", None)
    tool_kwargs: dict[str, Any] = {}
    parser_name = infer(hf) if infer is not None else None
    if parser_name is not None:
        import importlib

        module = importlib.import_module(f"mlx_lm.tool_parsers.{parser_name}")
        tool_kwargs = {
            "tool_parser": module.parse_tool_call,
            "tool_call_start": module.tool_call_start,
            "tool_call_end": module.tool_call_end,
        }
    # Byte-level BPE: BPEStreamingDetokenizer maps each token back to bytes and holds back
    # incomplete UTF-8 sequences, the choice mlx_lm.tokenizer_utils.load makes for a
    # tokenizer.json with a ByteLevel decoder. The default (naive) one re-decodes the line.
    return tokenizer_utils.TokenizerWrapper(
        hf,
        tokenizer_utils.BPEStreamingDetokenizer,
        eos_token_ids=spec.eos_token_ids,
        **tool_kwargs,
    )
