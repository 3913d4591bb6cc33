"""What the bench asks: the prompts, the per-request tags, and the sizes of every suite.

Every request text starts with a tag that differs per suite, repeat and stream, so no
measurement is a prompt-cache hit of an earlier one (except the growing conversation, where
reuse is the point).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

# Prompts that make a small instruct model write at length (no ignore_eos needed).
LONG_PROMPTS = (
    "Write a long, detailed essay about the history of the Roman Empire, from its founding "
    "to its fall.",
    "Explain in detail how the human heart works, step by step.",
    "Write a long story about a young girl who discovers a hidden city under the sea.",
    "Describe in detail the process of photosynthesis and why it matters for life on Earth.",
    "Write a detailed guide to planting and caring for a vegetable garden.",
    "Explain how computers work, from transistors to operating systems, in detail.",
    "Write a long letter from a sailor to his family describing a voyage around the world.",
    "Describe the water cycle in detail, with examples from different climates.",
)
FOLLOW_UPS = (
    "Tell me about the history of the city of Paris.",
    "What are the most famous buildings there?",
    "Describe one of them in more detail.",
    "Who built it, and when?",
    "What is the food like in that city?",
    "Give me a recipe for a typical dish from there.",
    "How would I make it vegetarian?",
    "What wine or drink goes well with it?",
    "Plan a three-day visit to the city for me.",
    "Summarize everything we talked about.",
)
_COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "silver", "golden")
_ANIMALS = ("fox", "owl", "horse", "rabbit", "whale", "tiger", "sparrow", "turtle", "wolf")
_FOODS = ("apples", "bread", "cherries", "carrots", "honey", "rice", "plums", "cheese", "beans")
_TOKENS_PER_SENTENCE = 17  # SmolLM2's tokenizer on the sentences below (digits split)


def tagged(tag: str, text: str) -> str:
    """A request text that no earlier request shares a prefix with (beyond the template)."""
    return f"[{tag}] {text}"


def prefill_text(target_tokens: int) -> str:
    """A deterministic document of roughly ``target_tokens`` tokens and a short question."""
    n = max(1, (target_tokens - 40) // _TOKENS_PER_SENTENCE)
    lines = [
        f"In room {i} the {_COLORS[i % 8]} {_ANIMALS[i % 9]} ate some {_FOODS[i % 9]} and then "
        "slept until morning."
        for i in range(1, n + 1)
    ]
    return " ".join(lines) + f"\n\nQuestion: what did the animal in room {n // 2 + 1} eat?"


@dataclass(frozen=True)
class Workload:
    """Every size the suites use; ``--quick`` shrinks it for the smoke test."""

    repeats: int
    max_tokens: int
    prefill_tokens: int
    concurrency: tuple[int, ...]
    turns: int
    turn_max_tokens: int
    warmups: int = 2
    restart_tokens: int = 3000  # the prompt of the restart suite (TTFT cold vs after restart)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Workload:
        if args.quick:
            base = cls(1, 8, 60, (1, 2), 3, 4, warmups=1, restart_tokens=200)
        else:
            base = cls(3, 200, 1000, (1, 4, 8), 10, 48)
        return cls(
            repeats=args.repeats or base.repeats,
            max_tokens=args.max_tokens or base.max_tokens,
            prefill_tokens=args.prefill_tokens or base.prefill_tokens,
            concurrency=tuple(args.concurrency) if args.concurrency else base.concurrency,
            turns=min(args.turns or base.turns, len(FOLLOW_UPS)),
            turn_max_tokens=args.turn_max_tokens or base.turn_max_tokens,
            warmups=base.warmups,
            restart_tokens=args.restart_tokens or base.restart_tokens,
        )
