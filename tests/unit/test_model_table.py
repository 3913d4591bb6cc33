"""The model table: [models.<id>] and legacy [model], routing by id/alias/glob, validation,
memory estimates and the pinned-versus-budget check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_mlxd
from mlxd.config import ConfigError, Settings, load_settings
from mlxd.errors import NotFound
from mlxd.models.memory import AUTO_SLOTS, batch_slots, estimate, pinned_problem, plan
from mlxd.models.registry import Router, model_table

BUNDLED = 'path = "bundled:SmolLM2-135M-Instruct"'

TWO = f"""
[models.small]
{BUNDLED}
dtype = "keep"
aliases = ["gpt-4o", "gpt-5*"]

[models.big]
{BUNDLED}
dtype = "float32"
aliases = ["claude-*"]
"""


def settings_from(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "mlxd.toml"
    path.write_text(text)
    return load_settings(path)


def test_models_tables_route_by_id_exact_alias_and_glob(tmp_path: Path) -> None:
    """The table name is the id; exact aliases and globs reach their entry; empty -> first."""
    router = Router.from_settings(settings_from(tmp_path, TWO))
    assert list(router.entries) == ["small", "big"]
    assert router.resolve("big").id == "big"
    assert router.resolve("gpt-4o").id == "small"
    assert router.resolve("gpt-5-codex").id == "small"
    assert router.resolve("claude-sonnet-4-5").id == "big"
    assert router.resolve(None).id == "small"
    assert router.resolve("").id == "small"


def test_unknown_name_is_model_not_found_listing_ids(tmp_path: Path) -> None:
    router = Router.from_settings(settings_from(tmp_path, TWO))
    with pytest.raises(NotFound) as err:
        router.resolve("llama-9000")
    assert err.value.code == "model_not_found"
    assert err.value.status == 404
    assert "small" in err.value.message and "big" in err.value.message


def test_fallback_and_default_are_configurable(tmp_path: Path) -> None:
    s = settings_from(tmp_path, TWO + '\n[routing]\ndefault = "big"\nfallback = "small"\n')
    router = Router.from_settings(s)
    assert router.resolve(None).id == "big"
    assert router.resolve("anything-else").id == "small"


def test_legacy_model_section_is_a_one_entry_table_answering_every_name(tmp_path: Path) -> None:
    """Configs written before [models] keep working: same id, every name reaches the model."""
    s = settings_from(tmp_path, f"[model]\n{BUNDLED}\ntemperature = 0.2\n")
    table = model_table(s)
    assert list(table) == ["SmolLM2-135M-Instruct"]
    assert table["SmolLM2-135M-Instruct"].temperature == 0.2
    router = Router.from_settings(s)
    assert router.resolve("m").id == "SmolLM2-135M-Instruct"
    named = settings_from(tmp_path, f'[model]\n{BUNDLED}\nid = "mine"\n')
    assert list(model_table(named)) == ["mine"]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (TWO.replace('"claude-*"', '"gpt-4o"'), "'gpt-4o'"),  # exact alias twice
        (TWO.replace('"claude-*"', '"gpt-*"'), "'gpt-*'"),  # overlapping globs
        (TWO.replace('"claude-*"', '"sm*"'), "'sm*'"),  # glob matching another id
        (TWO + f"\n[model]\n{BUNDLED}\n", "[model] and [models.<id>] are both given"),
        (TWO + '\n[routing]\ndefault = "nope"\n', "routing.default = 'nope'"),
        (TWO.replace("[models.big]", "[models.big]\nid = 'other'"), "the table name is the id"),
        (TWO.replace('dtype = "float32"', 'dtype = "float32"\nkeepalive = 3'), "keepalive"),
        ("[models]\nsmall = 3\n", "one table per model"),
    ],
)
def test_bad_tables_are_config_errors(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        settings_from(tmp_path, text)
    assert needle in str(err.value)


def test_estimate_counts_weights_in_the_served_dtype_and_kv_for_batch_and_context(
    tmp_path: Path,
) -> None:
    """float32 weights are ~4 bytes per element (the GGUF stores ~5 bits); KV scales with
    max_batch_size x context_length."""
    s = settings_from(tmp_path, TWO + "\n[engine]\nmax_batch_size = 2\n")
    table = model_table(s)
    small = estimate(table["small"], s.engine, "cpu")
    big = estimate(table["big"], s.engine, "cpu")
    assert small is not None and big is not None
    assert big.weights_bytes > 4 * small.weights_bytes
    short = table["big"].model_copy(update={"context_length": 1024})
    est_short = estimate(short, s.engine, "cpu")
    assert est_short is not None and est_short.kv_bytes * 8 == big.kv_bytes


def test_auto_batch_slots_per_backend_and_room() -> None:
    """'auto': the backend's most (8 CPU and Metal, 64 CUDA) when the room holds them, else
    as many sequences as fit, never fewer than 1; a number is kept as it is."""
    assert AUTO_SLOTS == {"cpu": 8, "metal": 8, "cuda": 64}
    per = 100
    assert batch_slots("auto", "cpu", 10_000, per) == 8
    assert batch_slots("auto", "metal", 10_000, per) == 8
    assert batch_slots("auto", "cuda", 10_000, per) == 64
    assert batch_slots("auto", "cuda", 2_599, per) == 25
    assert batch_slots("auto", "cpu", 50, per) == 1
    assert batch_slots("auto", "cpu", -5, per) == 1
    assert batch_slots("auto", "cuda", None, per) == 64  # budget unknown
    assert batch_slots(3, "cuda", 10_000, per) == 3
    assert batch_slots(200, "cpu", 50, per) == 200  # a number is the user's call


def test_plan_sizes_slots_from_the_budget_pinned_models_share_it(tmp_path: Path) -> None:
    """With 'auto' the batch slots follow the budget: a roomy budget gives the backend's
    most; a tight one fewer (the model still fits instead of being refused); pinned models
    split what their weights leave, so they always fit together; an on-demand model gets
    what the pinned ones leave. Estimates come from the real model files."""
    s = settings_from(tmp_path, TWO)
    table = model_table(s)
    alone = {i: estimate(e, s.engine, "cpu", "cpu") for i, e in table.items()}
    small, big = alone["small"], alone["big"]
    assert small is not None and big is not None and small.slots == 8
    per_small, per_big = small.kv_bytes // 8, big.kv_bytes // 8
    roomy = 10 * (small.total + big.total)
    on_cuda = plan(table, "auto", "gpu", "cuda", 100 * roomy)
    assert {i: e.slots for i, e in on_cuda.items() if e} == {"small": 64, "big": 64}
    assert {i: e.slots for i, e in plan(table, "auto", "cpu", "cpu", roomy).items() if e} == {
        "small": 8,
        "big": 8,
    }
    # Tight: the float32 model's weights plus 3.5 sequences' KV.
    tight = plan(table, "auto", "cpu", "cpu", big.weights_bytes + per_big * 7 // 2)
    got = tight["big"]
    assert got is not None and got.slots == 3 and got.kv_bytes == 3 * per_big
    assert plan(table, 8, "cpu", "cpu", 1)["big"].slots == 8  # type: ignore[union-attr]
    # Both pinned: equal shares of the budget their weights leave, so together they fit.
    both = {i: e.model_copy(update={"pinned": True}) for i, e in table.items()}
    assert per_big == 2 * per_small  # float32 KV against bfloat16
    limit = small.weights_bytes + big.weights_bytes + 6 * per_big
    shared = plan(both, "auto", "cpu", "cpu", limit)
    assert sum(e.total for e in shared.values() if e) <= limit
    assert [e.slots for e in shared.values() if e] == [6, 3]  # 3 float32 sequences' KV each
    # Only "small" pinned: "big" gets the budget the pinned one leaves.
    one = {**table, "small": both["small"]}
    left = plan(one, "auto", "cpu", "cpu", small.total + big.weights_bytes + 2 * per_big)
    assert left["small"] is not None and left["small"].slots == 8
    assert left["big"] is not None and left["big"].slots == 2
    # Two on-demand models on a big GPU split the room, so both stay loaded side by side...
    pair = plan(
        table, "auto", "gpu", "cuda", small.weights_bytes + big.weights_bytes + 80 * per_big
    )
    assert pair["big"] is not None and pair["big"].slots == 40
    assert pair["small"] is not None and pair["small"].slots == 64  # 80 fit: the cap
    assert (
        sum(e.total for e in pair.values() if e)
        <= small.weights_bytes + big.weights_bytes + 80 * per_big
    )
    # ...but where their even share is below the old fixed 8, each still gets 8 when 8 fit
    # beside the pinned models alone (one at a time, as before auto).
    limit = big.weights_bytes + 10 * per_big
    share = (limit - small.weights_bytes - big.weights_bytes) // 2
    assert share // per_big < 8 <= (limit - big.weights_bytes) // per_big
    floor = plan(table, "auto", "gpu", "cuda", limit)
    assert floor["big"] is not None and floor["big"].slots == 8
    # A model whose files are not here yet has no estimate (it is counted once loaded).
    missing = {"hub": table["big"].model_copy(update={"path": "nobody/not-downloaded-7b"})}
    assert plan(missing, "auto", "cpu", "cpu", roomy) == {"hub": None}


def test_pinned_model_larger_than_budget_is_a_problem(tmp_path: Path) -> None:
    s = settings_from(tmp_path, TWO.replace('dtype = "keep"', 'dtype = "keep"\npinned = true') + "")
    assert pinned_problem(s, "cpu", "cpu") is None
    tight = settings_from(
        tmp_path,
        TWO.replace('dtype = "keep"', 'dtype = "keep"\npinned = true')
        + "\n[engine]\nmemory_budget_bytes = 10000000\n",
    )
    problem = pinned_problem(tight, "cpu", "cpu")
    assert problem is not None and "models.small" in problem and "Hint:" in problem


def test_check_config_exits_78_for_pinned_over_budget_and_shows_the_table(tmp_path: Path) -> None:
    """check-config prints the effective table and memory plan; a pinned model that cannot fit
    is exit 78 with a hint."""
    path = tmp_path / "mlxd.toml"
    path.write_text(TWO)
    ok = run_mlxd("check-config", "--config", str(path))
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout)
    assert list(out["settings"]["models"]) == ["small", "big"]
    assert out["memory"]["models"]["big"]["weights_bytes"] > 0
    path.write_text(
        TWO.replace('dtype = "keep"', 'dtype = "keep"\npinned = true')
        + "\n[engine]\nmemory_budget_bytes = 10000000\n"
    )
    bad = run_mlxd("check-config", "--config", str(path))
    assert bad.returncode == 78
    assert "pinned" in bad.stderr and "Hint:" in bad.stderr


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(None, None), (300, 300.0), ("5m", 300.0), ("30s", 30.0), ("1h", 3600.0), (-1, 0.0)],
)
def test_request_keep_alive_reads_like_ollama(value: object, seconds: float | None) -> None:
    """Seconds or a duration; a negative value keeps the model loaded (config's 0)."""
    from mlxd.api.routing import keep_alive_seconds

    assert keep_alive_seconds(value) == seconds


def test_request_keep_alive_zero_unloads_once_idle_and_garbage_is_a_400() -> None:
    from mlxd.api.routing import IMMEDIATE, keep_alive_seconds
    from mlxd.errors import BadRequest

    assert keep_alive_seconds(0) == IMMEDIATE
    for bad in ("soon", True, "5 parsecs"):
        with pytest.raises(BadRequest):
            keep_alive_seconds(bad)


def test_ps_table_lists_loaded_models_first_with_memory_and_idle_time() -> None:
    from mlxd.ps import render

    table = render(
        [
            {"id": "b", "state": "unloaded", "keep_alive": 0},
            {
                "id": "a",
                "state": "loaded",
                "memory_bytes": 538_060_032,
                "idle_seconds": 75,
                "keep_alive": 300,
                "pinned": True,
                "default": True,
                "active": 1,
                "queued": 0,
                "max_batch_size": 8,
            },
        ],
        {"used_bytes": 600_000_000, "budget_bytes": 8_000_000_000},
    )
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["NAME", "STATE", "MEMORY"]
    assert lines[1].split() == [
        "a",
        "loaded",
        "538.1",
        "MB",
        "1m15s",
        "3m45s",
        "1/8",
        "pinned,default",
    ]
    assert lines[2].split()[:2] == ["b", "unloaded"]
    assert "of 8.0 GB budget" in table
