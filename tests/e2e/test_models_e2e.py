"""Many models, one daemon, against the real daemon and the official openai SDK.

The entries are made from the bundled SmolLM2 weights, in float32 (~540 MB) and as stored
(Q4_1, ~100 MB): each entry loads its own copy, so they are different models in memory
while the test downloads nothing. float32 is the fast path on the CPU backend (float16 has
no fast CPU kernels, so it is not used here).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from conftest import Daemon

PARIS = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Tell me a long story about a dragon."}]
BUNDLED = 'path = "bundled:SmolLM2-135M-Instruct"'
#: Small batch and context keep the KV part of each estimate small (and the test fast).
ENGINE = "[engine]\nwarmup = false\nmax_batch_size = 8\n"


def events(d: Daemon) -> list[dict[str, Any]]:
    out = []
    if d.log_path.exists():
        for line in d.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line still being written
    return out


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def health_models(d: Daemon) -> dict[str, dict[str, Any]]:
    with d.http() as http:
        return {m["id"]: m for m in http.get("/health").json()["models"]}


def rss_bytes(pid: int) -> int:
    """The daemon's resident set size, read from outside the process."""
    status = Path(f"/proc/{pid}/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True)
    return int(out.stdout.strip()) * 1024


def ask(client: openai.OpenAI, model: str, max_tokens: int = 12) -> tuple[str, str, float]:
    """(answering model, text, seconds to the first token) of a streamed greedy question."""
    start = time.perf_counter()
    first: float | None = None
    text, answered = [], ""
    stream = client.chat.completions.create(
        model=model, messages=PARIS, max_tokens=max_tokens, temperature=0, stream=True
    )
    for chunk in stream:
        answered = chunk.model
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - start
            text.append(chunk.choices[0].delta.content)
    return answered, "".join(text), first or 0.0


def write_config(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


TWO = f"""{ENGINE}
[models.smol]
{BUNDLED}
dtype = "float32"
context_length = 1024
aliases = ["gpt-5*"]

[models.smol-q4]
{BUNDLED}
dtype = "keep"
context_length = 1024
preload = false
keep_alive = 3
aliases = ["claude-*"]

[models.smol-b]
{BUNDLED}
dtype = "float32"
context_length = 512
preload = false
"""


def test_routing_load_on_demand_idle_unload_and_reload(start_daemon: Callable[..., Daemon]) -> None:
    """A then B answer Paris; /v1/models lists every model with its state; unknown names are
    404 model_not_found; alias globs route; 8 concurrent first requests load once; an idle
    model unloads after keep_alive and gives its memory back (RSS), the next request loads
    it again; a reload that removes one model leaves the others untouched; a bad edit is
    rejected and the last good table keeps serving."""
    d = start_daemon(TWO)
    client = d.client(timeout=120.0)
    with d.http() as http:
        listed = {m["id"]: m["state"] for m in http.get("/v1/models").json()["data"]}
    assert listed == {"smol": "loaded", "smol-q4": "unloaded", "smol-b": "unloaded"}

    model, text, _ = ask(client, "smol")
    assert model == "smol" and "Paris" in text

    # -- eight concurrent first requests for an unloaded model: one load, eight answers --
    mark = len(events(d))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: ask(client, "smol-b", 8), range(8)))
    assert all(m == "smol-b" and "Paris" in t for m, t, _ in results), results
    loading = [e for e in events(d)[mark:] if e["event"] == "model.loading"]
    assert [e["id"] for e in loading] == ["smol-b"]
    cold = max(first for _, _, first in results)
    _, _, warm = ask(client, "smol-b", 4)
    print(f"first token: cold smol-b (load included) {cold:.2f}s, warm {warm:.2f}s")

    # -- unknown names and alias globs --------------------------------------------------
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="llama-9000", messages=PARIS, max_tokens=4)
    body = err.value.body
    assert isinstance(body, dict) and body.get("code") == "model_not_found", body
    assert "smol-q4" in str(body.get("message"))
    assert ask(client, "gpt-5-mini", 4)[0] == "smol"
    # Claude Code's model name, through the Anthropic SDK: a stream to a cold model (the Q4
    # entry, loaded on demand; pings while it loads).
    claude = anthropic.Anthropic(base_url=d.base_url, api_key="unused", max_retries=0, timeout=300)
    with claude.messages.stream(
        model="claude-sonnet-4-5", max_tokens=12, messages=PARIS, extra_body={"temperature": 0}
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.model == "smol-q4" and "Paris" in text
    with d.http() as http:
        assert http.get("/v1/models/smol-q4").json()["state"] == "loaded"

    # -- keep_alive: unloaded when idle, RSS falls, the next request loads again ------------
    loaded = health_models(d)["smol-q4"]
    weights = loaded["memory_bytes"]
    assert weights > 50_000_000
    # The Q4 weights are small; measure the drop on the float32 model instead by giving it
    # a keep_alive through a request (as Ollama clients do).
    f32 = health_models(d)["smol"]["memory_bytes"]
    before = rss_bytes(d.process.pid)
    client.chat.completions.create(
        model="smol", messages=PARIS, max_tokens=2, extra_body={"keep_alive": "3s"}
    )
    wait_for(
        lambda: all(health_models(d)[i]["state"] == "unloaded" for i in ("smol", "smol-q4")),
        60,
        "smol and smol-q4 to unload when idle",
    )
    after = rss_bytes(d.process.pid)
    print(
        f"RSS {before / 1e6:.0f} MB -> {after / 1e6:.0f} MB; weights {(f32 + weights) / 1e6:.0f} MB"
    )
    assert before - after >= 0.8 * (f32 + weights)

    def idle_unloads() -> set[str]:
        return {
            e["id"] for e in events(d) if e["event"] == "model.unloaded" and e["reason"] == "idle"
        }

    wait_for(lambda: idle_unloads() >= {"smol", "smol-q4"}, 30, "model.unloaded (idle) events")
    resp = client.chat.completions.create(
        model="smol", messages=PARIS, max_tokens=12, temperature=0, extra_body={"keep_alive": -1}
    )
    assert resp.model == "smol" and "Paris" in (resp.choices[0].message.content or "")
    assert health_models(d)["smol"]["state"] == "loaded"

    # -- hot reload per entry: remove one, the others are untouched ------------------------
    loaded_at = health_models(d)["smol"]["loaded_at"]
    mark = len(events(d))
    write_config(d.config_path, TWO.split("[models.smol-b]")[0])
    wait_for(
        lambda: next((e for e in events(d)[mark:] if e["event"] == "config.reloaded"), None),
        60,
        "config.reloaded",
    )
    wait_for(lambda: "smol-b" not in health_models(d), 30, "smol-b to leave /health")

    def unloads() -> list[tuple[str, str]]:
        return [(e["id"], e["reason"]) for e in events(d)[mark:] if e["event"] == "model.unloaded"]

    wait_for(unloads, 30, "model.unloaded for smol-b")
    assert unloads() == [("smol-b", "removed")]
    assert health_models(d)["smol"]["state"] == "loaded"
    assert health_models(d)["smol"]["loaded_at"] == loaded_at

    # -- a bad edit is rejected; the last good table keeps serving -------------------------
    mark = len(events(d))
    bad = (
        TWO.split("[models.smol-b]")[0] + "\n[models.other]\n" + BUNDLED + '\naliases = ["gpt-*"]\n'
    )
    write_config(d.config_path, bad)
    rejected = wait_for(
        lambda: next((e for e in events(d)[mark:] if e["event"] == "config.reload_rejected"), None),
        60,
        "config.reload_rejected",
    )
    assert "gpt-*" in rejected["error"]
    assert ask(client, "smol", 4)[0] == "smol"
    assert d.stop() == 0


def test_budget_evicts_lru_never_pinned_never_busy(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """With a budget that holds the pinned model and one other: alternating requests for two
    others all succeed (each evicts the other), the pinned model is never evicted, and a
    stream in flight is never cut: the competing request gets 503 with Retry-After naming
    the busy model, and succeeds once the stream is over."""
    from mlxd.config import load_settings
    from mlxd.models.memory import estimate
    from mlxd.models.registry import model_table

    text = f"""{ENGINE.replace("max_batch_size = 8", "max_batch_size = 1")}
[models.pin]
{BUNDLED}
dtype = "keep"
context_length = 512
pinned = true

[models.f32]
{BUNDLED}
dtype = "float32"
context_length = 512
preload = false

[models.f32b]
{BUNDLED}
dtype = "float32"
context_length = 256
preload = false
"""
    probe = tmp_path / "probe.toml"
    probe.write_text(text)
    settings = load_settings(probe)
    est = {i: estimate(e, settings.engine, "cpu") for i, e in model_table(settings).items()}
    assert all(v is not None for v in est.values())
    pin, f32, f32b = (est[i].total for i in ("pin", "f32", "f32b"))  # type: ignore[union-attr]
    budget = pin + f32 + f32b // 2  # pin plus one of the others, never both
    d = start_daemon(
        text.replace("max_batch_size = 1", f"max_batch_size = 1\nmemory_budget_bytes = {budget}")
    )
    client = d.client(timeout=120.0)

    for name in ("f32", "f32b", "f32", "f32b"):
        model, answer, _ = ask(client, name, 8)
        assert model == name and "Paris" in answer
        states = {i: m["state"] for i, m in health_models(d).items()}
        other = "f32b" if name == "f32" else "f32"
        assert states == {"pin": "loaded", name: "loaded", other: "unloaded"}, states

    # f32b is loaded; a stream on it holds it while f32 is asked for.
    chunks: list[str] = []
    finish: list[str | None] = []

    def stream() -> None:
        for chunk in client.chat.completions.create(
            model="f32b", messages=STORY, max_tokens=48, temperature=0, stream=True
        ):
            if chunk.choices:
                chunks.append(chunk.choices[0].delta.content or "")
                finish.append(chunk.choices[0].finish_reason)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(stream)
        wait_for(lambda: len(chunks) > 2 or running.done(), 60, "the stream to start")
        with pytest.raises(openai.InternalServerError) as err:
            client.chat.completions.create(model="f32", messages=PARIS, max_tokens=4)
        running.result(timeout=120)
    assert err.value.status_code == 503
    assert err.value.response.headers.get("Retry-After")
    assert "f32b" in str(err.value.body)
    assert finish[-1] == "length" and "".join(chunks)
    # Once the stream is over f32 loads (evicting f32b), here through a Responses stream.
    with client.responses.stream(
        model="f32", input="What is the capital of France?", max_output_tokens=8, temperature=0
    ) as stream:
        final = stream.get_final_response()
    assert final.model == "f32" and "Paris" in final.output_text
    unloads = [(e["id"], e["reason"]) for e in events(d) if e["event"] == "model.unloaded"]
    assert ("f32b", "evicted") in unloads and all(i != "pin" for i, _ in unloads)
    assert d.stop() == 0


def test_auto_batch_slots_follow_the_budget(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """``max_batch_size = "auto"`` (the default) under a budget that holds the model's
    weights and 2.5 sequences at its context: check-config plans 2 slots where a fixed 8 does
    not fit, the daemon loads the model with 2 (/health, /metrics, the ``model.loaded``
    event), and of three concurrent streams the third starts only after one of the first two
    has ended; all run to the end. A config edit to ``max_batch_size = 1`` resizes the loaded
    model once it is idle, without loading it again."""
    from conftest import run_mlxd
    from mlxd.config import load_settings
    from mlxd.models.memory import estimate
    from mlxd.models.registry import model_table

    text = f"""[engine]
warmup = false

[models.smol]
{BUNDLED}
dtype = "float32"
context_length = 2048
"""
    probe = tmp_path / "probe.toml"
    probe.write_text(text)
    settings = load_settings(probe)
    alone = estimate(model_table(settings)["smol"], settings.engine, "cpu", "cpu")
    assert alone is not None and alone.slots == 8
    per = alone.kv_bytes // 8
    budget = alone.weights_bytes + per * 5 // 2
    text = text.replace("warmup = false", f"warmup = false\nmemory_budget_bytes = {budget}")
    for setting, slots in (("", 2), ("max_batch_size = 8\n", 8)):
        probe.write_text(text.replace("[models.smol]", setting + "\n[models.smol]"))
        plan = json.loads(run_mlxd("--config", str(probe), "check-config").stdout)
        planned = plan["memory"]["models"]["smol"]
        assert planned["max_batch_size"] == slots
        assert (planned["total"] <= budget) == (slots == 2), planned

    d = start_daemon(text)
    assert health_models(d)["smol"]["max_batch_size"] == 2
    with d.http() as http:
        assert 'mlxd_model_batch_slots{model="smol"} 2.0' in http.get("/metrics").text
    loaded = [e for e in events(d) if e.get("event") == "model.loaded"]
    assert loaded and loaded[-1]["max_batch_size"] == 2
    client = d.client(timeout=120.0)
    busiest = 0

    def stream() -> tuple[float, float, str | None]:
        """(first text, end, finish reason), monotonic seconds."""
        first, final = 0.0, None
        for chunk in client.chat.completions.create(
            model="smol", messages=STORY, max_tokens=32, temperature=0, stream=True
        ):
            if chunk.choices and chunk.choices[0].delta.content and not first:
                first = time.monotonic()
            if chunk.choices and chunk.choices[0].finish_reason:
                final = chunk.choices[0].finish_reason
        return first, time.monotonic(), final

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        runs = [pool.submit(stream) for _ in range(3)]
        while not all(r.done() for r in runs):
            busiest = max(busiest, health_models(d)["smol"]["active"])
            time.sleep(0.05)
        results = sorted(r.result() for r in runs)  # by first text
    assert [final for _, _, final in results] == ["length"] * 3
    assert busiest <= 2
    # Two slots: the last stream's first text came when one of the others ended (half a
    # stream's time of slack for the client's threads; with a third slot all three start
    # together, a whole stream's time earlier).
    first_end = min(end for _, end, _ in results[:2])
    assert results[2][0] >= first_end - (first_end - results[0][0]) / 2

    loaded_at = health_models(d)["smol"]["loaded_at"]
    write_config(
        d.config_path, text.replace("warmup = false", "warmup = false\nmax_batch_size = 1")
    )
    wait_for(lambda: health_models(d)["smol"]["max_batch_size"] == 1, 60, "the model to be resized")
    assert health_models(d)["smol"]["loaded_at"] == loaded_at  # not loaded again
    resized = [e for e in events(d) if e.get("event") == "model.resized"]
    assert resized and resized[-1]["was"] == 2 and resized[-1]["max_batch_size"] == 1
    assert ask(client, "smol", 4)[0] == "smol"
    assert d.stop() == 0


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (f'\n[models.other]\n{BUNDLED}\naliases = ["smol*"]\n', "also matches"),
        (f"\n[models.other]\n{BUNDLED}\nkeepalive = 3\n", "unknown key"),
        ("\n[engine]\nmemory_budget_bytes = 1000000\n", "pinned models need"),
        (f"\n[model]\n{BUNDLED}\n", "both given"),
    ],
)
def test_bad_model_tables_exit_78(
    start_daemon: Callable[..., Daemon], extra: str, needle: str
) -> None:
    """Duplicate claims on a name, unknown keys, a pinned model over the budget, and [model]
    next to [models.<id>] each stop the daemon at start with exit 78 and the reason."""
    text = f"[models.smol]\n{BUNDLED}\npinned = true\n" + extra
    d = start_daemon(text, wait=False)
    assert d.process.wait(timeout=120) == 78
    assert needle in d.stderr_tail()
