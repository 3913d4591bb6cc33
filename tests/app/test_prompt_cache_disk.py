"""The disk tier under the real engine and bundled model: a budget that holds through many
prompts, and damaged files that are ignored without changing an answer."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from test_engine import ask as ask_engine

from mlxd.config import EngineSettings, ModelSettings
from mlxd.engine.core import (
    Engine,
    Finished,
)

pytestmark = pytest.mark.timeout(900)

#: Each prompt is over one 64-token block, so each one is written to disk.
FILLER = (
    "Please read this note carefully before you answer. The note is long on purpose, so that "
    "the prompt covers more than one block of the cache index, and it ends with a question. "
)


def start(folder: Path, disk_bytes: int) -> Engine:
    eng = Engine(
        ModelSettings(),
        EngineSettings(max_batch_size=2, prompt_cache_disk_bytes=disk_bytes),
        state_dir=folder,
    )
    eng.start()
    assert eng.ready_event.wait(180), eng.load_error
    return eng


async def ask(engine: Engine, question: str) -> tuple[str, Finished]:
    """A short greedy answer to the filler text plus ``question`` (the engine tests' helper)."""
    return await ask_engine(engine, FILLER + question, max_tokens=4)


def entry_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.safetensors"))


def test_the_directory_stays_under_a_small_budget_through_20_prompts(tmp_path: Path) -> None:
    """20 distinct prompts with a budget of about three entries: after every write the
    directory is under the budget, and the newest entry is kept."""
    engine = start(tmp_path, 1 << 30)  # sized below, once one entry's size is known
    try:
        asyncio.run(ask(engine, "Question 0: what is 0 plus 1?"))
        assert engine.disk_cache.flush(60)
        one = entry_files(tmp_path)[0].stat().st_size
        budget = 3 * one + one // 2
        engine.retune(engine.settings.model_copy(update={"prompt_cache_disk_bytes": budget}))
        assert entry_files(tmp_path)  # hot reload: the budget changes, the entry stays

        async def many() -> None:
            for i in range(1, 20):
                await ask(engine, f"Question {i}: what is {i} plus {i + 1}?")
                assert engine.disk_cache.flush(60)
                assert sum(p.stat().st_size for p in entry_files(tmp_path)) <= budget

        asyncio.run(many())
        usage = engine.disk_cache.usage()
        assert usage["bytes"] <= budget and usage["entries"] == 3
    finally:
        engine.stop()


def test_damaged_files_are_ignored_and_the_answer_is_unchanged(tmp_path: Path) -> None:
    """A truncated entry, a corrupt one and random bytes in the model's directory: the next
    engine deletes them, recomputes, and answers exactly as it did cold."""
    questions = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?"]
    engine = start(tmp_path, 1 << 30)
    try:
        cold = [asyncio.run(ask(engine, q))[0] for q in questions]
        assert engine.disk_cache.flush(60)
    finally:
        engine.stop()
    truncated, corrupt, kept = entry_files(tmp_path)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    raw = bytearray(corrupt.read_bytes())
    raw[len(raw) // 2] ^= 0x55
    corrupt.write_bytes(bytes(raw))
    random_file = kept.parent / f"{'0' * 32}.safetensors"
    random_file.write_bytes(os.urandom(10_000))

    engine = start(tmp_path, 1 << 30)
    try:
        assert not truncated.exists() and not random_file.exists()  # found when indexed
        warm = [asyncio.run(ask(engine, q)) for q in questions]
        assert [text for text, _ in warm] == cold
        by_file = {p.stem for p in entry_files(tmp_path)}
        assert kept.stem in by_file
        # The corrupt file fails its checksum when read and is deleted; the intact one hits.
        assert engine.cache_stats.disk_hits >= 1
        assert sorted(fin.cached_tokens > 0 for _, fin in warm).count(True) >= 1
    finally:
        engine.stop()
