"""Reasoning fields against the real daemon and the bundled model (which does not think)."""

from __future__ import annotations

import openai


def test_real_model_has_no_reasoning(client: openai.OpenAI) -> None:
    """The bundled model does not think: no reasoning_content, no reasoning items, zero
    reasoning tokens, and the answer is still there (streaming and not)."""
    chat = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Say hi"}], max_tokens=8, temperature=0
    )
    assert chat.choices[0].message.content
    assert getattr(chat.choices[0].message, "reasoning_content", None) is None
    assert chat.usage is not None and chat.usage.completion_tokens_details is not None
    assert chat.usage.completion_tokens_details.reasoning_tokens == 0
    chunks = list(
        client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "Say hi"}],
            max_tokens=8,
            temperature=0,
            stream=True,
        )
    )
    assert all(
        "reasoning_content" not in c.choices[0].delta.model_dump(exclude_none=True)
        for c in chunks
        if c.choices
    )
    resp = client.responses.create(model="m", input="Say hi", max_output_tokens=8, temperature=0)
    assert [o.type for o in resp.output] == ["message"]
    assert resp.output_text
