"""Think blocks and stop strings on text that arrives in arbitrary pieces."""

from __future__ import annotations

import pytest

from mlxd.engine.textfilter import TextFilter


def run(f: TextFilter, pieces: list[str]) -> tuple[str, str, bool]:
    content = reasoning = ""
    stopped = False
    for p in pieces:
        out = f.feed(p)
        content += out.content
        reasoning += out.reasoning
        stopped |= out.stopped
    end = f.finish()
    return content + end.content, reasoning + end.reasoning, stopped or end.stopped


def every_split(text: str) -> list[list[str]]:
    return [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text)]


TEXT = "Hi <think>deep thought</think>\n\nThe answer is 42. END and more"


@pytest.mark.parametrize("pieces", every_split(TEXT))
def test_separate_mode_splits_channels_at_any_boundary(pieces: list[str]) -> None:
    """Reasoning goes to its channel, the stop string cuts content, wherever chunks split."""
    content, reasoning, stopped = run(TextFilter(stop=["END"], reasoning="separate"), pieces)
    assert content == "Hi The answer is 42. "
    assert reasoning == "deep thought"
    assert stopped


@pytest.mark.parametrize("pieces", every_split(TEXT))
def test_strip_mode_drops_reasoning(pieces: list[str]) -> None:
    """'strip' removes think blocks entirely."""
    content, reasoning, _ = run(TextFilter(stop=["END"], reasoning="strip"), pieces)
    assert (content, reasoning) == ("Hi The answer is 42. ", "")


def test_inline_mode_keeps_tags() -> None:
    """'inline' leaves think blocks in the content."""
    content, reasoning, _ = run(TextFilter(stop=[], reasoning="inline"), ["a<think>b</think>c"])
    assert (content, reasoning) == ("a<think>b</think>c", "")


def test_template_opened_think_block() -> None:
    """When the prompt ends inside <think>, text up to </think> is reasoning."""
    content, reasoning, _ = run(
        TextFilter(stop=[], reasoning="separate", in_think=True), ["plan</th", "ink>\nok"]
    )
    assert (content, reasoning) == ("ok", "plan")


def test_held_prefix_released_at_end() -> None:
    """Text that only looked like the start of a stop string is released at the end."""
    f = TextFilter(stop=["STOP"], reasoning="separate")
    assert f.feed("go ST").content == "go "
    end = f.finish()
    assert end.content == "ST"
    assert not end.stopped


def test_nothing_after_stop() -> None:
    """After a stop string, further pieces produce nothing."""
    f = TextFilter(stop=["\n\n"], reasoning="separate")
    out = f.feed("line\n\nnext")
    assert (out.content, out.stopped) == ("line", True)
    assert f.feed("more").content == ""
