"""Structured output against the real daemon (bundled SmolLM2-135M) through the OpenAI SDK:
``response_format`` (Chat) and ``text.format`` (Responses) enforced by the grammar."""

from __future__ import annotations

import concurrent.futures
import json
from typing import Any

import openai
import pytest

pytestmark = pytest.mark.e2e

# maxLength bounds the one free-form field: at temperature 1.5 a 135M model otherwise can
# write a name until max_tokens runs out (the output would then be cut, finish_reason length).
PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
PERSON_FORMAT: Any = {
    "type": "json_schema",
    "json_schema": {"name": "person", "schema": PERSON, "strict": True},
}
ASK = [{"role": "user", "content": "Invent a person. Give a name and an age."}]


def check_person(text: str) -> dict[str, Any]:
    obj = json.loads(text)
    assert isinstance(obj, dict) and set(obj) == {"name", "age"}, text
    assert isinstance(obj["name"], str) and len(obj["name"]) <= 40, text
    assert type(obj["age"]) is int, text
    return dict(obj)


def test_json_schema_twenty_of_twenty(client: openai.OpenAI) -> None:
    """20 generations at temperatures 0..1.5 (different seeds), sent concurrently: every one
    finishes with stop and parses and validates against the schema."""

    def one(i: int) -> tuple[str | None, str | None]:
        resp = client.chat.completions.create(
            model="m", messages=ASK, response_format=PERSON_FORMAT,
            temperature=round(i * 1.5 / 19, 2), seed=i, max_tokens=64,
        )  # fmt: skip
        return resp.choices[0].finish_reason, resp.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(20)))
    for finish, content in results:
        assert finish == "stop", content
        check_person(content or "")


def test_json_object_streaming(client: openai.OpenAI) -> None:
    """json_object while streaming: the joined deltas are one JSON object."""
    chunks = client.chat.completions.create(
        model="m", messages=ASK, response_format={"type": "json_object"}, temperature=0.5,
        seed=7, max_tokens=64, stream=True,
    )  # fmt: skip
    parts = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in parts)
    if parts[-1].choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert text.startswith("{")


def test_sdk_parse_with_pydantic_model(client: openai.OpenAI) -> None:
    """client.chat.completions.parse() with a pydantic model (what apps use) gets .parsed."""
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int

    resp = client.chat.completions.parse(
        model="m", messages=ASK, response_format=Person, temperature=0, max_tokens=64
    )
    parsed = resp.choices[0].message.parsed
    assert isinstance(parsed, Person)


def test_responses_text_format_json_schema(client: openai.OpenAI) -> None:
    """Responses text.format (flat json_schema): output_text validates; the format is echoed."""
    resp = client.responses.create(
        model="m",
        input=ASK[0]["content"],
        text={"format": {"type": "json_schema", "name": "p", "schema": PERSON, "strict": True}},
        temperature=0.7,
        max_output_tokens=64,
    )
    assert resp.status == "completed"
    check_person(resp.output_text)
    assert resp.text is not None and resp.text.format is not None
    assert resp.text.format.type == "json_schema"


def test_unsupported_schema_is_400(client: openai.OpenAI) -> None:
    """A schema keyword the grammar cannot enforce is a 400 unsupported_schema naming it."""
    schema = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="m",
            messages=ASK,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        )
    assert err.value.code == "unsupported_schema"
    assert "uniqueItems" in str(err.value.message)
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(
            model="m", input="hi", text={"format": {"type": "json_schema", "name": "x",
                                                    "schema": schema}},
        )  # fmt: skip
    assert err.value.code == "unsupported_schema"


def test_cut_by_max_tokens_is_length(client: openai.OpenAI) -> None:
    """When max_tokens ends the output early the finish_reason is length (the JSON may be
    cut); Responses reports incomplete / max_output_tokens."""
    resp = client.chat.completions.create(
        model="m", messages=ASK, response_format=PERSON_FORMAT, max_tokens=3, temperature=0
    )
    assert resp.choices[0].finish_reason == "length"
    assert (resp.choices[0].message.content or "").startswith("{")
    r = client.responses.create(
        model="m", input="hi", max_output_tokens=3,
        text={"format": {"type": "json_schema", "name": "p", "schema": PERSON}},
    )  # fmt: skip
    assert r.status == "incomplete"
    assert r.incomplete_details is not None
    assert r.incomplete_details.reason == "max_output_tokens"
