"""Values at the edge of what the engine can compute are settled before they reach it:
seeds, sampling floats, schemas without a finite instance, prompts too long to tokenize."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from mlxd.api.params import SamplingFields, generation_params, parse
from mlxd.config import Settings
from mlxd.engine.schema_finite import has_finite_instance
from mlxd.errors import BadRequest, ContextLengthExceeded
from mlxd.prompt import build_prompt


# -- seed ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("given", "seed"),
    [(0, 0), (42, 42), (-1, 2**64 - 1), (-(2**63), 2**63), (2**64 - 1, 2**64 - 1)],
)
def test_seeds_in_64_bit_range_map_into_mlx_range(given: int, seed: int) -> None:
    """Signed and unsigned 64-bit seeds are accepted; negatives wrap to MLX's uint64 keys."""
    assert parse(SamplingFields, {"seed": given}).seed == seed


@pytest.mark.parametrize("given", [2**64, -(2**63) - 1, 10**100])
def test_seeds_outside_64_bits_are_400(given: int) -> None:
    """A seed no 64-bit key can hold is a 400 naming ``seed`` (it used to hang the request and
    fail the batch beside it)."""
    with pytest.raises(BadRequest) as err:
        parse(SamplingFields, {"seed": given})
    assert err.value.param == "seed"


def test_mapped_seed_is_accepted_by_mlx() -> None:
    """The mapped extremes are valid MLX PRNG keys."""
    import mlx.core as mx

    for given in (-1, 2**64 - 1, -(2**63)):
        seed = parse(SamplingFields, {"seed": given}).seed
        assert seed is not None
        mx.eval(mx.random.key(seed))


# -- sampling floats -------------------------------------------------------------------------
@dataclass
class FakeLM:
    context_length: int = 100


def params_for(**fields: Any) -> Any:
    req = parse(SamplingFields, fields)
    return generation_params(
        Settings(),
        FakeLM(),  # type: ignore[arg-type]
        10,
        requested_max=5,
        temperature=req.temperature,
        top_p=req.top_p,
        repetition_penalty=req.repetition_penalty,
    )


@pytest.mark.parametrize("fields", [{"temperature": 1e-300}, {"temperature": 5e-324}])
def test_vanishing_temperature_is_greedy(fields: dict[str, float]) -> None:
    """A temperature float32 cannot tell from 0 is greedy decoding, not a division by 0."""
    assert params_for(**fields).temperature == 0.0


def test_vanishing_top_p_is_greedy() -> None:
    """top_p 1e-320 keeps only the most likely token: greedy, with top_p reset to 1."""
    p = params_for(top_p=1e-320, temperature=0.9)
    assert (p.temperature, p.top_p) == (0.0, 1.0)


def test_ordinary_sampling_values_pass_unchanged() -> None:
    p = params_for(temperature=0.3, top_p=0.5, repetition_penalty=1.2)
    assert (p.temperature, p.top_p, p.repetition_penalty) == (0.3, 0.5, 1.2)


@pytest.mark.parametrize("penalty", [1e-300, 0.0, 0.009, 10.5])
def test_repetition_penalty_outside_bounds_is_400(penalty: float) -> None:
    """repetition_penalty must lie in [0.01, 10]: near 0 it divides logits by ~0."""
    with pytest.raises(BadRequest) as err:
        parse(SamplingFields, {"repetition_penalty": penalty})
    assert err.value.param == "repetition_penalty"


# -- schemas ---------------------------------------------------------------------------------
SELF = {"type": "object", "properties": {"next": {"$ref": "#"}}, "required": ["next"]}


@pytest.mark.parametrize(
    "schema",
    [
        SELF,
        {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
        {
            "$defs": {"n": {"type": "array", "items": {"$ref": "#/$defs/n"}, "minItems": 1}},
            "$ref": "#/$defs/n",
        },
        {"anyOf": [SELF, {"$ref": "#/anyOf/0"}]},
        {"type": "object", "properties": {"x": SELF}, "required": ["x"]},
    ],
)
def test_schemas_without_a_finite_instance_are_found(schema: dict[str, Any]) -> None:
    assert not has_finite_instance(schema)


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"next": {"$ref": "#"}}},  # optional: {} ends it
        {"anyOf": [{"type": "null"}, SELF]},
        {
            "$defs": {"tree": {"type": "object", "properties": {"kids": {
                "type": "array", "items": {"$ref": "#/$defs/tree"}}}, "required": ["kids"]}},
            "$ref": "#/$defs/tree",
        },  # kids may be []
        {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
        {"$ref": "https://example.com/remote.json"},
        True,
    ],
)  # fmt: skip
def test_recursive_schemas_with_a_base_case_are_kept(schema: Any) -> None:
    assert has_finite_instance(schema)


def test_grammar_compiler_refuses_schema_without_finite_instance() -> None:
    """The compile step answers such a schema with unsupported_schema (a 400), before
    generation: it used to run to max_tokens and return text that is not JSON."""
    from mlxd.engine.constrain import GrammarUnsupported, _compile

    with pytest.raises(GrammarUnsupported) as err:
        _compile(None, SELF, kind="json_schema")  # type: ignore[arg-type]
    assert err.value.status == 400
    assert err.value.code == "unsupported_schema"


# -- prompt length ---------------------------------------------------------------------------
class CountingTokenizer:
    """A tokenizer whose longest token is 8 bytes; encoding is recorded, not done."""

    chat_template = None
    _tokenizer = None

    def __init__(self) -> None:
        self.encoded = 0

    def get_vocab(self) -> dict[str, int]:
        return {"a": 0, "abcdefgh": 1}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        self.encoded += 1
        return [0] * (len(text) // 8)


@dataclass
class TinyLM:
    tokenizer: CountingTokenizer
    context_length: int = 1000


def test_prompt_longer_than_any_tokenization_is_refused_before_tokenizing() -> None:
    """A prompt whose byte count alone proves it cannot fit is a 400 context_length_exceeded
    and the tokenizer never runs (a 10 MB prompt used to take ~20 s to be refused)."""
    lm = TinyLM(CountingTokenizer())
    with pytest.raises(ContextLengthExceeded) as err:
        build_prompt(lm, [{"role": "user", "content": "x" * 9000}])  # type: ignore[arg-type]
    assert "at least" in err.value.message
    assert lm.tokenizer.encoded == 0


def test_prompt_that_might_fit_is_tokenized() -> None:
    lm = TinyLM(CountingTokenizer())
    build_prompt(lm, [{"role": "user", "content": "x" * 7000}])  # type: ignore[arg-type]
    assert lm.tokenizer.encoded == 1
