"""The prompt cache's disk tier across a daemon restart, through the official OpenAI SDK.

A restart keeps the state dir (and with it ``<state_dir>/prompt_cache``): the same long
prompt is served from the disk tier with the same greedy text, and a Responses chain and a
resent Chat history reuse what the previous process computed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import openai
import pytest

from conftest import Daemon
from mlxd.engine.diskcache import BLOCK_TOKENS

pytestmark = pytest.mark.e2e

#: About 1,175 prompt tokens with the bundled model's tokenizer (checked below): more than
#: two prefill chunks of 512, and a cold prefill that stays short on a slow machine.
LONG_TEXT = " ".join(
    f"Fact {i}: the number {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(1, 90)
)
#: Well over one 64-token block, so a first turn lands on disk.
STORY = (
    "Here is a short story to remember. A lighthouse keeper named Ada lived on a rocky island "
    "with a grey cat called Pebble. Every evening she climbed one hundred and twelve steps to "
    "light the lamp, and every morning she wrote the weather in a blue notebook. One stormy "
    "night a small fishing boat lost its way, and the light guided it safely into the harbour."
)


def disk_entries(d: Daemon) -> int:
    with d.http() as http:
        return int(http.get("/health").json()["prompt_cache"]["disk"]["entries"])


def wait_written(d: Daemon, n: int) -> None:
    """Writes run in the background; a restart right after a request could race them."""
    deadline = time.monotonic() + 120
    while disk_entries(d) < n:
        assert time.monotonic() < deadline, "the prompt cache was not written to disk"
        time.sleep(0.2)


def restart(start_daemon: Callable[..., Daemon], d: Daemon) -> Daemon:
    assert d.stop() == 0
    return start_daemon(state_dir=d.state_dir)


def chat(client: openai.OpenAI, messages: list[dict[str, str]], max_tokens: int) -> Any:
    return client.chat.completions.create(
        model="m",
        messages=messages,
        temperature=0,
        max_tokens=max_tokens,  # type: ignore[arg-type]
    )


@pytest.mark.timeout(1500)
def test_a_long_prompt_is_served_from_disk_after_a_restart(
    start_daemon: Callable[..., Daemon],
) -> None:
    """A 1,175-token prompt, a restart, the same prompt: at least 1,100 tokens come from the
    disk tier (cached_tokens) and the greedy answer is the one computed cold."""
    messages = [{"role": "user", "content": LONG_TEXT + "\nWhich fact comes first?"}]
    d = start_daemon()
    # A cold prefill on a slow two-core machine without OpenBLAS takes a minute or more.
    cold = chat(d.client(timeout=600), messages, 12)
    assert 1150 <= cold.usage.prompt_tokens <= 1250, cold.usage
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    wait_written(d, 1)

    d = restart(start_daemon, d)
    warm = chat(d.client(timeout=600), messages, 12)
    assert warm.usage.prompt_tokens_details.cached_tokens >= 1100, warm.usage
    assert warm.choices[0].message.content == cold.choices[0].message.content
    with d.http() as http:
        disk = http.get("/health").json()["prompt_cache"]["disk"]
    assert disk["hits"] == 1 and disk["bytes"] > 0


@pytest.mark.timeout(600)
def test_a_responses_chain_and_a_chat_history_reuse_the_disk_after_a_restart(
    start_daemon: Callable[..., Daemon],
) -> None:
    """The turn after a restart reuses the previous turn from disk: a ``previous_response_id``
    chain (rebuilt from the store; its rendering of the earlier turn shares all but the last
    few tokens with the first prompt) and a resent Chat history (its whole first prompt)."""
    d = start_daemon()
    client = d.client(timeout=120)
    first = client.responses.create(model="m", input=STORY, temperature=0, max_output_tokens=8)
    history = [{"role": "user", "content": STORY + " What is the cat called?"}]
    answer = chat(client, history, 8)
    wait_written(d, 2)

    d = restart(start_daemon, d)
    client = d.client(timeout=120)
    chained = client.responses.create(
        model="m",
        previous_response_id=first.id,
        input="Who is the keeper?",
        temperature=0,
        max_output_tokens=8,
    )
    assert chained.usage is not None
    # After a restart RAM is empty: a reuse of at least one 64-token block came from disk.
    assert chained.usage.input_tokens_details.cached_tokens >= BLOCK_TOKENS
    resent = [
        *history,
        {"role": "assistant", "content": answer.choices[0].message.content},
        {"role": "user", "content": "And how many steps?"},
    ]
    again = chat(client, resent, 8)
    assert again.usage.prompt_tokens_details.cached_tokens >= answer.usage.prompt_tokens
    with d.http() as http:
        assert http.get("/health").json()["prompt_cache"]["disk"]["hits"] == 2


@pytest.mark.timeout(600)
def test_a_resent_history_reuses_the_disk_after_an_idle_unload(
    start_daemon: Callable[..., Daemon],
) -> None:
    """An idle unload drops the model's RAM cache with its memory; the next turn of a resent
    Chat history loads the model again and reuses the first turn from the disk tier."""
    d = start_daemon('[models.smol]\npath = "bundled:SmolLM2-135M-Instruct"\nkeep_alive = 3\n')
    client = d.client(timeout=120)
    history = [{"role": "user", "content": STORY + " What is the cat called?"}]
    answer = client.chat.completions.create(
        model="smol", messages=history, temperature=0, max_tokens=8
    )
    wait_written(d, 1)
    deadline = time.monotonic() + 120
    while not any(
        e["event"] == "model.unloaded" and e.get("reason") == "idle" for e in d.log_events()
    ):
        assert time.monotonic() < deadline, "the model was not unloaded when idle"
        time.sleep(0.3)
    resent = [
        *history,
        {"role": "assistant", "content": answer.choices[0].message.content},
        {"role": "user", "content": "And how many steps?"},
    ]
    again = client.chat.completions.create(
        model="smol", messages=resent, temperature=0, max_tokens=8
    )
    assert again.usage is not None and answer.usage is not None
    assert again.usage.prompt_tokens_details.cached_tokens >= answer.usage.prompt_tokens
    with d.http() as http:
        assert http.get("/health").json()["prompt_cache"]["disk"]["hits"] >= 1
