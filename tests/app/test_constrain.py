"""mlxd.engine.constrain: JSON-schema / json_object / tool-call constrained decoding.

Generation tests run the bundled SmolLM2-135M through mlx_lm's ``generate`` and
``BatchGenerator`` with a :class:`GrammarProcessor` as logits processor; the rest drive the
processor and matchers directly with the model's real 49k-token tokenizer (no forward pass).
All MLX work runs on pytest's main thread, the thread that loaded the model.
"""

from __future__ import annotations

from mlxd.backend import preload_blas

# Before mlx is first imported: float32 matmuls are ~30x faster on OpenBLAS (no-op on macOS
# or when another test module imported mlx first).
preload_blas()

import json  # noqa: E402
from dataclasses import replace  # noqa: E402
from typing import Any  # noqa: E402

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import pytest  # noqa: E402
from mlx_lm import generate  # noqa: E402
from mlx_lm.sample_utils import make_sampler  # noqa: E402

from mlxd.engine.constrain import (  # noqa: E402
    Grammar,
    GrammarProcessor,
    GrammarUnsupported,
    TokenizerInfo,
    compile_json_object,
    compile_json_schema,
    compile_text,
    compile_tool_call,
    compile_tool_calls,
    tokenizer_info_for,
)
from mlxd.models.gguf import bundled_gguf_path, load_gguf  # noqa: E402

PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
QUESTION = [
    {"role": "system", "content": "You answer in JSON."},
    {"role": "user", "content": "Describe a person with a name and an age."},
]
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                "required": ["city", "unit"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "$defs": {"n": {"type": "integer"}},
                "type": "object",
                "properties": {"a": {"$ref": "#/$defs/n"}, "b": {"$ref": "#/$defs/n"}},
                "required": ["a", "b"],
            },
        },
    },
]


@pytest.fixture(scope="module")
def loaded() -> tuple[nn.Module, Any]:
    # The engine dequantizes small models on the CPU backend (quantized CPU matmuls are slow).
    on_cpu = mx.default_device() == mx.cpu
    model, tokenizer, _ = load_gguf(bundled_gguf_path(), dequantize=mx.float32 if on_cpu else None)
    return model, tokenizer


@pytest.fixture(scope="module")
def info(loaded: tuple[nn.Module, Any]) -> TokenizerInfo:
    return tokenizer_info_for(loaded[1])


@pytest.fixture(scope="module")
def person(info: TokenizerInfo) -> Grammar:
    return compile_json_schema(info, PERSON)


def check_person(text: str) -> dict[str, Any]:
    """json.loads + a hand-written check of PERSON (strict: no other keys)."""
    obj = json.loads(text)
    assert isinstance(obj, dict), text
    assert set(obj) == {"name", "age"}, text
    assert isinstance(obj["name"], str), text
    assert isinstance(obj["age"], int) and not isinstance(obj["age"], bool), text
    return obj


def accepts(grammar: Grammar, tokenizer: Any, text: str) -> bool:
    """Whether ``text`` (tokenized as the model would) is a complete match of ``grammar``."""
    matcher = grammar.new_matcher()
    return bool(matcher.consume_tokens(tokenizer.encode(text))) and matcher.is_accepting()


# --------------------------------------------------------------------------------------------
# Real generations
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("temperature", "seed"), [(0.0, 0), (0.7, 1), (0.7, 2), (1.0, 3), (1.0, 4)]
)
def test_generation_matches_schema(
    loaded: tuple[nn.Module, Any], person: Grammar, temperature: float, seed: int
) -> None:
    model, tokenizer = loaded
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    processor = GrammarProcessor(person)
    mx.random.seed(seed)
    text = generate(
        model,
        tokenizer,
        prompt,
        max_tokens=64,
        sampler=make_sampler(temperature),
        logits_processors=[processor],
    )
    assert processor.error is None
    assert processor.is_finished(), text
    check_person(text)
    assert text.startswith('{"name": "'), text  # compact, properties in schema order


def test_batch_generator_keeps_each_sequence_on_its_grammar(
    loaded: tuple[nn.Module, Any], info: TokenizerInfo, person: Grammar
) -> None:
    """The engine's path: BatchGenerator calls each sequence's own processor per step."""
    from mlx_lm.generate import BatchGenerator

    model, tokenizer = loaded
    tool = compile_tool_call(info, TOOLS, name="add")
    prompts = [
        tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True),
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is 2 plus 3?"}], add_generation_prompt=True
        ),
    ]
    processors = [GrammarProcessor(person), GrammarProcessor(tool)]
    gen = BatchGenerator(model, stop_tokens=[[t] for t in sorted(info.eos_token_ids)])
    uids = gen.insert(prompts, max_tokens=[64, 64], logits_processors=[[p] for p in processors])
    tokens: dict[int, list[int]] = {uid: [] for uid in uids}
    done: set[int] = set()
    while len(done) < len(uids):
        for r in gen.next_generated():
            if r.finish_reason is None or r.finish_reason == "length":
                tokens[r.uid].append(r.token)
            if r.finish_reason is not None:
                assert r.finish_reason == "stop", tokenizer.decode(tokens[r.uid])
                done.add(r.uid)
    gen.close()
    check_person(tokenizer.decode(tokens[uids[0]]))
    call = json.loads(tokenizer.decode(tokens[uids[1]]))
    assert call["name"] == "add"
    assert set(call["arguments"]) == {"a", "b"}
    assert all(type(v) is int for v in call["arguments"].values())
    assert all(p.error is None for p in processors)


# --------------------------------------------------------------------------------------------
# Unsupported schemas: a clear 400, never silently ignored
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "feature"),
    [
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
        ({"type": "array", "contains": {"const": 3}}, "contains"),
        ({"type": "integer", "not": {"const": 3}}, "not"),
        ({**PERSON, "if": {"required": ["age"]}, "then": {}}, "if, then"),
        ({"type": "string", "format": "fancy"}, "format:fancy"),
        ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "oneOf"),
        # Nested and with the llguidance escape hatch: still refused.
        (
            {
                "x-guidance": {"lenient": True},
                "type": "object",
                "properties": {"tags": {"type": "array", "uniqueItems": True}},
            },
            "uniqueItems",
        ),
    ],
)
def test_unsupported_feature_raises(
    info: TokenizerInfo, schema: dict[str, Any], feature: str
) -> None:
    with pytest.raises(GrammarUnsupported) as err:
        compile_json_schema(info, schema)
    assert err.value.status == 400
    assert err.value.feature == feature
    assert feature.split(":")[-1].split(",")[0] in err.value.message


@pytest.mark.parametrize(
    "schema",
    [
        {"$ref": "https://example.com/schema.json"},
        {"type": "strin"},
        {"$ref": "#/$defs/missing"},
        {"type": "string", "pattern": "(?<=a)b"},
        {"type": "integer", "minimum": 5, "maximum": 1},
    ],
)
def test_invalid_or_unenforceable_schema_raises(
    info: TokenizerInfo, schema: dict[str, Any]
) -> None:
    with pytest.raises(GrammarUnsupported) as err:
        compile_json_schema(info, schema)
    assert err.value.status == 400
    assert err.value.message


def test_supported_schema_features_compile(
    loaded: tuple[nn.Module, Any], info: TokenizerInfo
) -> None:
    """What pydantic and OpenAI clients send: $defs/$ref, anyOf with null, enums, bounds."""
    tokenizer = loaded[1]
    schema = {
        "$defs": {"Unit": {"enum": ["c", "f"], "type": "string", "title": "Unit"}},
        "title": "Reading",
        "type": "object",
        "properties": {
            "city": {"type": "string", "minLength": 1, "maxLength": 20, "description": "x"},
            "temp": {"type": "number", "minimum": -90, "maximum": 60},
            "unit": {"$ref": "#/$defs/Unit"},
            "when": {"anyOf": [{"type": "string", "format": "date"}, {"type": "null"}]},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3,
                     "uniqueItems": False},
        },
        "required": ["city", "temp", "unit", "when", "tags"],
    }  # fmt: skip
    grammar = compile_json_schema(info, schema)
    good = {"city": "Oslo", "temp": -3.5, "unit": "c", "when": None, "tags": ["cold"]}
    assert accepts(grammar, tokenizer, json.dumps(good))
    assert not accepts(grammar, tokenizer, json.dumps({**good, "temp": 61}))
    assert not accepts(grammar, tokenizer, json.dumps({**good, "unit": "k"}))
    assert not accepts(grammar, tokenizer, json.dumps({**good, "when": "tomorrow"}))
    assert schema["properties"]["tags"]["uniqueItems"] is False  # caller's dict untouched


# --------------------------------------------------------------------------------------------
# Grammar semantics
# --------------------------------------------------------------------------------------------


def test_strict_closes_objects(loaded: tuple[nn.Module, Any], info: TokenizerInfo) -> None:
    tokenizer = loaded[1]
    extra = '{"name": "Ann", "age": 3, "email": "a@b.c"}'
    assert not accepts(compile_json_schema(info, PERSON), tokenizer, extra)
    assert accepts(compile_json_schema(info, PERSON, strict=False), tokenizer, extra)
    assert "additionalProperties" not in PERSON
    # allOf branches stay open, or the intersection would be unsatisfiable.
    both = {"allOf": [PERSON, {"properties": {"email": {"type": "string"}}, "required": ["email"]}]}
    assert accepts(compile_json_schema(info, both), tokenizer, extra)


def test_json_object_accepts_any_object_only(
    loaded: tuple[nn.Module, Any], info: TokenizerInfo
) -> None:
    tokenizer = loaded[1]
    grammar = compile_json_object(info)
    assert accepts(grammar, tokenizer, '{"a": [1, {"b": null}], "c": "d"}')
    assert not accepts(grammar, tokenizer, "[1, 2]")
    assert not accepts(grammar, tokenizer, '"text"')


def test_tool_call_grammar(loaded: tuple[nn.Module, Any], info: TokenizerInfo) -> None:
    tokenizer = loaded[1]
    any_tool = compile_tool_call(info, TOOLS, name=None)
    only_add = compile_tool_call(info, TOOLS, name="add")
    weather = '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}'
    add = '{"name": "add", "arguments": {"a": 2, "b": 3}}'
    assert accepts(any_tool, tokenizer, weather)
    assert accepts(any_tool, tokenizer, add)
    assert not accepts(only_add, tokenizer, weather)
    assert accepts(only_add, tokenizer, add)
    assert not accepts(any_tool, tokenizer, '{"name": "add", "arguments": {"a": "2", "b": 3}}')
    assert not accepts(any_tool, tokenizer, '{"name": "sub", "arguments": {"a": 2, "b": 3}}')
    flat = [{"type": "function", "name": "ping"}]  # Responses-API shape, no parameters
    assert accepts(
        compile_tool_call(info, flat, name=None), tokenizer, '{"name": "ping", "arguments": {}}'
    )
    with pytest.raises(GrammarUnsupported):
        compile_tool_call(info, TOOLS, name="missing")


def test_processor_masks_and_handles_eos(loaded: tuple[nn.Module, Any], person: Grammar) -> None:
    """Drive the processor as mlx-lm does: prompt first, then one sampled token per call."""
    tokenizer = loaded[1]
    vocab = person.tokenizer_info.vocab_size
    (eos,) = person.tokenizer_info.eos_token_ids
    width = vocab + 64  # logits wider than the tokenizer (padded embedding rows)
    logits = mx.zeros((1, width))
    processor = GrammarProcessor(person)
    context = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)

    out = processor(mx.array(context), logits)
    allowed = (out[0] > -mx.inf).tolist()
    assert not allowed[eos]  # nothing generated yet: the model may not stop
    assert not any(allowed[vocab:])  # ids past the tokenizer are never allowed
    assert allowed[tokenizer.encode('{"')[0]]

    body = tokenizer.encode('{"name": "Ann", "age": 30')
    for token in body:
        out = processor(mx.array(context), logits)
        assert (out[0, token] > -mx.inf).item(), tokenizer.decode([token])
        assert not (out[0, eos] > -mx.inf).item()
        context.append(token)
    assert not processor.is_finished()

    close = tokenizer.encode("}")
    context += close
    out = processor(mx.array(context), logits)
    assert processor.is_finished()
    assert (out[0] > -mx.inf).tolist() == [i == eos for i in range(width)]  # EOS only
    context.append(eos)
    out = processor(mx.array(context), logits)  # mlx-lm's look-ahead call after EOS
    assert processor.error is None
    assert (out[0, eos] > -mx.inf).item()


def test_processor_error_forces_eos(loaded: tuple[nn.Module, Any], person: Grammar) -> None:
    tokenizer = loaded[1]
    (eos,) = person.tokenizer_info.eos_token_ids
    processor = GrammarProcessor(person)
    logits = mx.zeros((1, person.tokenizer_info.vocab_size))
    processor(mx.array([1, 2, 3]), logits)
    out = processor(mx.array([1, 2, 3, *tokenizer.encode("hello")[:1]]), logits)
    assert processor.error is not None
    assert (out[0] > -mx.inf).sum().item() == 1
    assert (out[0, eos] > -mx.inf).item()


def test_tokenizer_info_is_cached(loaded: tuple[nn.Module, Any], info: TokenizerInfo) -> None:
    assert tokenizer_info_for(loaded[1]) is info
    assert info.vocab_size >= 49152
    assert info.eos_token_ids


def test_tool_schemas_drop_keywords_the_grammar_cannot_enforce(
    loaded: tuple[nn.Module, Any], info: TokenizerInfo
) -> None:
    """Claude Code's tool schemas use propertyNames: the tool grammar compiles without it
    (and says so in its warnings) and still enforces the rest; response_format schemas with
    the same keyword are still refused."""
    params = {
        "type": "object",
        "properties": {
            "path": {"type": "string"},
            "env": {"type": "object", "propertyNames": {"pattern": "^[A-Z]+$"}},
        },
        "required": ["path"],
    }
    tools = [{"type": "function", "function": {"name": "Read", "parameters": params}}]
    grammar = compile_tool_calls(info, tools, text=True)
    assert any("propertyNames" in w for w in grammar.warnings)
    assert accepts(grammar, loaded[1], '{"name": "Read", "arguments": {"path": "a"}}')
    assert not accepts(grammar, loaded[1], '{"name": "Read", "arguments": {"env": {}}}')
    with pytest.raises(GrammarUnsupported):
        compile_json_schema(info, params)


# --------------------------------------------------------------------------------------------
# The repeat guard (agent loops)
# --------------------------------------------------------------------------------------------

CALL = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}'


def drive(grammar: Grammar, tokenizer: Any, text: str) -> tuple[GrammarProcessor, set[int]]:
    """Feed ``text`` token by token as mlx-lm does (each token must be allowed); return the
    processor and the token ids it allows next."""
    processor = GrammarProcessor(grammar)
    context = [1, 2, 3]  # a stand-in prompt: the processor only counts it
    logits = mx.zeros((1, grammar.tokenizer_info.vocab_size))
    out = processor(mx.array(context), logits)
    for token in tokenizer.encode(text):
        assert (out[0, token] > -mx.inf).item(), tokenizer.decode([token])
        context.append(token)
        out = processor(mx.array(context), logits)
    allowed = (out[0] > -mx.inf).tolist()
    return processor, {i for i, ok in enumerate(allowed) if ok}


def test_repeated_parallel_call_ends_the_output(
    loaded: tuple[nn.Module, Any], info: TokenizerInfo
) -> None:
    """A complete call that repeats an earlier call of the same output leaves only EOS (the
    reader drops it), instead of letting the model repeat it until max_tokens; a different
    second call may still be followed by a third."""
    tokenizer = loaded[1]
    grammar = compile_tool_calls(info, TOOLS, parallel=True, text=True)
    eos = set(info.eos_token_ids)
    processor, allowed = drive(grammar, tokenizer, CALL + "\n" + CALL)
    assert allowed == eos and processor.is_finished() and processor.error is None
    _, allowed = drive(grammar, tokenizer, CALL + "\n" + CALL.replace("Paris", "Rome"))
    assert allowed > eos  # "\n" for another call


def test_repeat_of_an_answered_call_turns_into_an_answer(
    loaded: tuple[nn.Module, Any], info: TokenizerInfo
) -> None:
    """A call repeating one whose result the prompt holds is followed by a newline, then text
    that cannot start another call, then EOS as usual; any other call ends normally."""
    tokenizer = loaded[1]
    base = compile_tool_calls(info, TOOLS, text=True)
    grammar = replace(base, answered=frozenset({CALL}), after_repeat=compile_text(info))
    (newline,) = tokenizer.encode("\n")
    _, allowed = drive(grammar, tokenizer, CALL)
    assert allowed == {newline}
    _, allowed = drive(grammar, tokenizer, CALL + "\n")
    assert tokenizer.encode("{")[0] not in allowed and tokenizer.encode("The")[0] in allowed
    assert not allowed & set(info.eos_token_ids)
    processor, allowed = drive(grammar, tokenizer, CALL + "\nIt is sunny in Paris.")
    assert set(info.eos_token_ids) <= allowed and processor.is_accepting()
    _, allowed = drive(grammar, tokenizer, CALL.replace("Paris", "Rome"))
    assert allowed == set(info.eos_token_ids)
    _, allowed = drive(grammar, tokenizer, "Paris is sunny.")  # an answer: no guard
    assert len(allowed) > 1000


def test_text_grammar_cannot_start_a_call(
    loaded: tuple[nn.Module, Any], info: TokenizerInfo
) -> None:
    """compile_text (tool_choice none after calls): any text, but not a leading '{' or
    whitespace, so an earlier call's JSON line cannot be copied as the answer."""
    tokenizer = loaded[1]
    grammar = compile_text(info)
    assert accepts(grammar, tokenizer, "The weather is sunny {really}.\n\nYes.")
    assert not accepts(grammar, tokenizer, CALL)
    assert not accepts(grammar, tokenizer, " leading space")
    assert compile_text(info) is grammar  # cached per tokenizer
