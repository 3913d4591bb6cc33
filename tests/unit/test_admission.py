"""How many waiting prompts a batch step admits (mlxd.engine.batch.prompt_rows), on mlx-lm's
real ``BatchGenerator`` with a tiny random-weight Llama (no weights from disk: the admission
depends on prompt lengths, not on what the model says)."""

from __future__ import annotations

from typing import Any

import pytest

from mlxd.engine.batch import PREFILL_CHUNKS_PER_STEP, prompt_rows

CHUNK = 64


@pytest.fixture(scope="module")
def model() -> Any:
    import mlx.core as mx
    from mlx_lm.models import llama

    mx.random.seed(0)
    args = llama.ModelArgs.from_dict(
        {
            "model_type": "llama",
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "intermediate_size": 64,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "rms_norm_eps": 1e-5,
            "vocab_size": 128,
            "tie_word_embeddings": True,
        }
    )
    m = llama.Model(args)
    mx.eval(m.parameters())
    return m


def generator(model: Any) -> Any:
    from mlx_lm.generate import BatchGenerator

    return BatchGenerator(
        model,
        max_tokens=1000,
        stop_tokens=[],
        completion_batch_size=64,
        prefill_batch_size=PREFILL_CHUNKS_PER_STEP,
        prefill_step_size=CHUNK,
    )


def prompts(n: int, length: int) -> list[list[int]]:
    return [[(7 * i + j) % 120 + 3 for j in range(length)] for i in range(n)]


def step(gen: Any) -> None:
    gen.prefill_batch_size = prompt_rows(gen, CHUNK)
    gen.next()


def test_a_burst_of_short_prompts_starts_together(model: Any) -> None:
    """20 prompts of 10 tokens fit in the budget: all enter the prompt batch in one step and
    move to generation in the next, where mlx-lm's default would take 8 per two steps."""
    gen = generator(model)
    gen.insert(prompts(20, 10), max_tokens=[5] * 20)
    assert prompt_rows(gen, CHUNK) == 20
    step(gen)
    assert len(gen._prompt_batch) == 20 and not gen._unprocessed_sequences
    step(gen)
    assert len(gen._generation_batch) == 20 and len(gen._prompt_batch) == 0
    gen.close()


def test_long_prompts_keep_the_old_bound(model: Any) -> None:
    """Prompts of several chunks each: at most PREFILL_CHUNKS_PER_STEP rows prefill per step,
    as before; short prompts behind them wait while long rows fill the budget."""
    gen = generator(model)
    gen.insert(prompts(12, 5 * CHUNK), max_tokens=[5] * 12)
    gen.insert(prompts(3, 8), max_tokens=[5] * 3)
    assert prompt_rows(gen, CHUNK) == PREFILL_CHUNKS_PER_STEP
    step(gen)
    assert len(gen._prompt_batch) == PREFILL_CHUNKS_PER_STEP
    # The long rows stay (4 chunks left each): nothing more fits.
    assert prompt_rows(gen, CHUNK) == PREFILL_CHUNKS_PER_STEP
    gen.close()


def test_the_next_group_is_admitted_when_the_previous_moves_on(model: Any) -> None:
    """Rows that finish prefilling this step do not count against the budget: the next
    waiting prompts enter in the same step (mlx-lm counts them and waits a step)."""
    gen = generator(model)
    long = prompts(PREFILL_CHUNKS_PER_STEP, CHUNK + 1)  # one chunk, then the last token
    gen.insert(long, max_tokens=[5] * len(long))
    step(gen)
    assert len(gen._prompt_batch) == PREFILL_CHUNKS_PER_STEP
    gen.insert(prompts(4, 10), max_tokens=[5] * 4)
    assert prompt_rows(gen, CHUNK) == PREFILL_CHUNKS_PER_STEP + 4
    step(gen)
    assert len(gen._generation_batch) == PREFILL_CHUNKS_PER_STEP
    assert len(gen._prompt_batch) == 4 and not gen._unprocessed_sequences
    gen.close()


def test_prompts_longer_than_the_budget_start(model: Any) -> None:
    """Prompts longer than the whole budget start at once, one chunk each per step."""
    gen = generator(model)
    gen.insert(prompts(2, 20 * CHUNK), max_tokens=[5] * 2)
    assert prompt_rows(gen, CHUNK) == 2  # two full chunks fit in eight
    step(gen)
    assert len(gen._prompt_batch) == 2
    gen.close()


def test_an_unknown_layout_falls_back_to_eight() -> None:
    class Other:
        pass

    assert prompt_rows(Other(), CHUNK) == PREFILL_CHUNKS_PER_STEP
