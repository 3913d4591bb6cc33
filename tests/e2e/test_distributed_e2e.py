"""One model across a process group: ``mlxd distributed --run`` starts real ranks with
``mlx.launch`` (ring backend on loopback), rank 0 serves HTTP, and the answers must be the
single process's, token for token, at temperature 0: alone, streamed, and batched.

The faults are real too: a follower killed mid-stream (SIGKILL) ends the stream with an error
frame and the supervisor starts the group again, which then answers as before; an edit of
the model table restarts the group in order; a follower that hangs (SIGSTOP) fails the open
stream after ``step_timeout`` and ``/health`` turns 503 naming it. Ranks are found by their
environment (``MLX_RANK`` and this daemon's state directory), as a person would find them
with ``ps``.

Starting a group costs a few seconds per rank, so each group serves several checks: the
pipeline group (2 ranks) is shared by the tests of this module in file order (the fault
tests last, since they break it), the tensor group (3 ranks: SmolLM2 has 9 query and 3 KV
heads) is one test.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from conftest import Daemon, spawn_daemon, wait_until

PROMPTS = [
    "What is the capital of France?",
    "List three colors.",
    "Say hello in Spanish.",
    "What is 2+2?",
]
MAX_TOKENS = 10
#: The pipeline group's step_timeout, which the hung-rank test waits out: generous for one
#: step (a decode step or a prefill chunk of four short prompts on two ranks takes seconds on
#: a loaded 2-core machine without OpenBLAS), short enough to wait for once.
STEP_TIMEOUT = 45.0
#: Groups that test no hang get a step_timeout no slow machine reaches.
NO_HANG_TIMEOUT = 600.0
#: Starting ranks (imports, loading, joining the ring) on a slow, busy machine.
START_TIMEOUT = 300.0
LONG = "Write a long story about a dragon who learns to read."


def ring_base(ranks: int) -> int:
    """A first port with ``ranks`` free ports from it (the ring listens on one per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + ranks >= 65535:
            continue
        try:
            for port in range(base, base + ranks):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise AssertionError("no run of free ports for the ring")


def start_group(tmp: Path, ranks: int, sharding: str, step_timeout: float) -> Daemon:
    config = (
        "[distributed]\n"
        f'sharding = "{sharding}"\n'
        f"starting_port = {ring_base(ranks)}\n"
        f"step_timeout = {step_timeout}\n"
    )
    d = spawn_daemon(
        tmp,
        config,
        command=[sys.executable, "-m", "mlxd", "distributed", "--run", "-n", str(ranks)],
    )
    try:
        d.wait_ready(timeout=START_TIMEOUT)
    except Exception:
        stop_group(d)
        raise
    return d


def stop_group(d: Daemon) -> None:
    for pid in rank_pids(d).values():  # a stopped rank would hold the stop up
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    d.stop(timeout=60)
    assert not rank_pids(d), "ranks outlived the supervisor"


def rank_pids(d: Daemon) -> dict[int, int]:
    """{rank: pid} of this daemon's ranks (the processes whose environment names its state
    directory and a rank)."""
    mark = f"MLXD_SERVER__STATE_DIR={d.state_dir}".encode()
    found: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if mark not in env or b"serve" not in cmdline or b"python" not in cmdline:
            continue
        for var in env:
            if var.startswith(b"MLX_RANK="):
                found[int(var.split(b"=", 1)[1])] = int(entry.name)
    return found


def ask(d: Daemon, prompt: str, *, stream: bool = False) -> tuple[str, int]:
    """(text, completion tokens) of a greedy Chat Completions answer."""
    client = d.client(timeout=600.0)
    messages: Any = [{"role": "user", "content": prompt}]
    if not stream:
        r = client.chat.completions.create(
            model="m", messages=messages, temperature=0, max_tokens=MAX_TOKENS
        )
        assert r.usage is not None
        return r.choices[0].message.content or "", r.usage.completion_tokens
    chunks = client.chat.completions.create(
        model="m",
        messages=messages,
        temperature=0,
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, used = "", 0
    for chunk in chunks:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            used = chunk.usage.completion_tokens
    return text, used


def ask_all(d: Daemon) -> list[tuple[str, int]]:
    """Every prompt at once (the batch path), the first one streamed."""
    with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [pool.submit(ask, d, p, stream=i == 0) for i, p in enumerate(PROMPTS)]
        return [f.result() for f in futures]


def long_stream(d: Daemon) -> Iterator[Any]:
    """A long greedy stream, already producing (three chunks read)."""
    stream = d.client(timeout=600.0).chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": LONG}],
        temperature=0,
        max_tokens=2000,
        stream=True,
    )
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    return chunks


def wait_for_new_group(d: Daemon, before: dict[int, int]) -> None:
    """The supervisor started a new group (no process of ``before`` left) and it is ready."""
    wait_until(
        lambda: (
            (p := rank_pids(d))
            and len(p) == len(before)
            and set(p.values()).isdisjoint(before.values())
        ),
        START_TIMEOUT,
        "the supervisor to start the group again",
        interval=1.0,
    )
    d.wait_ready(timeout=START_TIMEOUT)


@pytest.fixture(scope="module")
def single(shared_daemon: Daemon) -> list[tuple[str, int]]:
    """The single process's answers: the reference."""
    return [ask(shared_daemon, p) for p in PROMPTS]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start_group(tmp_path_factory.mktemp("pipeline"), 2, "pipeline", STEP_TIMEOUT)
    try:
        yield d
    finally:
        stop_group(d)


def test_pipeline_group_answers_like_one_process(
    pipeline: Daemon, single: list[tuple[str, int]]
) -> None:
    group = dict(pipeline.info["health"]["distributed"])
    memory = group.pop("rank_memory_bytes")
    assert group == {"ranks": 2, "backend": "ring", "sharding": "pipeline", "state": "ok"}
    # Each rank holds about half of the model (15 of 30 layers each; rank 0 also the head).
    assert len(memory) == 2 and all(m > 0 for m in memory)
    assert max(memory) < 3 * min(memory), memory
    assert sorted(rank_pids(pipeline)) == [0, 1]
    assert ask(pipeline, PROMPTS[0]) == single[0]
    assert ask(pipeline, PROMPTS[1], stream=True) == single[1]
    assert ask_all(pipeline) == single
    # The follower logs to its own file beside rank 0's.
    rank1 = pipeline.state_dir / "logs" / "mlxd.rank1.log"
    assert "distributed.follower" in rank1.read_text()


def test_group_keeps_the_rest_of_the_daemon(pipeline: Daemon) -> None:
    """Responses chains are stored by rank 0; metrics describe the group; embeddings, which
    a group does not serve, get a clear 501."""
    client = pipeline.client(timeout=600.0)
    first = client.responses.create(
        model="m", input="My name is Ada.", temperature=0, max_output_tokens=8
    )
    second = client.responses.create(
        model="m",
        input="What is my name?",
        previous_response_id=first.id,
        temperature=0,
        max_output_tokens=8,
    )
    assert client.responses.retrieve(second.id).previous_response_id == first.id
    # Structured output: rank 0 runs the grammar, the followers follow its tokens.
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
        "additionalProperties": False,
    }
    shaped = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "Where is the Eiffel Tower? Answer in JSON."}],
        temperature=0,
        max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
    )
    assert set(json.loads(shaped.choices[0].message.content or "")) == {"city"}
    with pipeline.http(timeout=30.0) as http:
        metrics = http.get("/metrics").text
        assert "mlxd_distributed_ranks 2.0" in metrics
        assert 'mlxd_distributed_rank_up{rank="1"} 1.0' in metrics
        assert 'mlxd_distributed_rank_memory_bytes{rank="1"}' in metrics
        resp = http.post("/v1/embeddings", json={"model": "m", "input": "hi"})
        assert resp.status_code == 501, resp.text
        assert "split across ranks" in resp.json()["error"]["message"]


def test_killed_rank_ends_the_stream_and_the_group_comes_back(
    pipeline: Daemon, single: list[tuple[str, int]]
) -> None:
    """SIGKILL a follower mid-stream: the stream ends with an error frame (not a hang, not a
    clean finish), the supervisor starts the group again, and it answers as before."""
    before = rank_pids(pipeline)
    chunks = long_stream(pipeline)
    os.kill(before[1], signal.SIGKILL)
    killed = time.monotonic()
    with pytest.raises(openai.APIError, match=r"process group is broken|shutting down"):
        for _ in chunks:
            pass
    assert time.monotonic() - killed < STEP_TIMEOUT + 30
    # The supervisor starts a new group (new processes) that serves again.
    wait_for_new_group(pipeline, before)
    assert ask(pipeline, PROMPTS[0]) == single[0]


def test_model_edit_restarts_the_group_in_order(pipeline: Daemon) -> None:
    """A config edit that changes the model table: rank 0 stops the followers and exits 75,
    the supervisor starts the group again with the new file, which then serves."""
    before = rank_pids(pipeline)
    with pipeline.config_path.open("a") as f:
        f.write("\n[engine]\nmax_batch_size = 4\n")
    wait_for_new_group(pipeline, before)
    assert "restart the group to apply the change (exit 75)" in pipeline.log_tail(200000)
    text, used = ask(pipeline, PROMPTS[3])
    assert text and used > 0


def test_hung_rank_fails_the_stream_after_step_timeout(pipeline: Daemon) -> None:
    """SIGSTOP a follower mid-stream: nothing raises on rank 0, so the watchdog fails the
    stream after ``step_timeout`` and ``/health`` turns 503 naming the rank."""
    ranks = rank_pids(pipeline)
    chunks = long_stream(pipeline)
    os.kill(ranks[1], signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        with pytest.raises(openai.APIError, match="step_timeout"):
            for _ in chunks:
                pass
        # The message names step_timeout: the watchdog ended it, within a generous bound.
        assert time.monotonic() - stopped < STEP_TIMEOUT + 60
        with pipeline.http(timeout=30.0) as http:
            health = http.get("/health")
            assert health.status_code == 503
            group = health.json()["distributed"]
            assert group["state"] == "broken" and group["ranks_lost"] == [1]
            assert "rank(s) 1 of 2" in group["error"]
            resp = http.post(
                "/v1/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            )
            assert resp.status_code == 503
            assert "process group is broken" in resp.json()["error"]["message"]
            assert 'mlxd_distributed_rank_up{rank="1"} 0.0' in http.get("/metrics").text
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(ranks[1], signal.SIGKILL)


def test_tensor_group_of_three_answers_like_one_process(
    tmp_path: Path, single: list[tuple[str, int]]
) -> None:
    d = start_group(tmp_path / "tensor", 3, "tensor", NO_HANG_TIMEOUT)
    try:
        assert d.info["health"]["distributed"]["sharding"] == "tensor"
        assert d.info["health"]["distributed"]["ranks"] == 3
        assert ask_all(d) == single  # four at once, the first one streamed
    finally:
        stop_group(d)


def test_group_refuses_several_models(tmp_path: Path) -> None:
    """A group serves one model: a table of two is a config error (78) on every rank, and
    the supervisor keeps trying (a person fixes the file) until it is stopped."""
    config = (
        '[models.a]\npath = "bundled:SmolLM2-135M-Instruct"\n'
        '[models.b]\npath = "bundled:SmolLM2-135M-Instruct"\n'
        f"[distributed]\nstarting_port = {ring_base(2)}\n"
    )
    d = spawn_daemon(
        tmp_path,
        config,
        command=[sys.executable, "-m", "mlxd", "distributed", "--run", "-n", "2"],
    )
    try:
        wait_until(
            lambda: "served alone" in d.log_tail(20000) and "starting it again" in d.log_tail(),
            START_TIMEOUT,
            "the refusal and the supervisor's retry",
            interval=0.5,
        )
        assert d.process.poll() is None
    finally:
        assert d.stop(timeout=60) == 0
