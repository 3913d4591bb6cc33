"""``mlxd logs``: rendering, filters, rotated-file history and following, on hand-written logs."""

from __future__ import annotations

import argparse
import json
import threading
import time
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest

from conftest import run_mlxd
from mlxd.config import LoggingSettings, Settings
from mlxd.logview import Filters, Follower, follow, format_line, log_files, run


def event(ts: str, level: str, name: str, **fields: Any) -> str:
    return json.dumps(
        {
            "timestamp": f"2026-11-25T01:{ts}.123456Z",
            "level": level,
            "event": name,
            **fields,
            "logger": "mlxd.api",
        }
    )


REQUEST = event(
    "42:24",
    "info",
    "request.completed",
    request_id="req_abc",
    method="POST",
    path="/v1/chat/completions",
    status=200,
    duration_ms=1662.1,
    model="SmolLM2",
    prompt_tokens=37,
    completion_tokens=7,
    stream=True,
)
GARBAGE = '{"timestamp": "2026-11-25T01:4'  # a line cut short by a crash


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    """mlxd.log.2 (oldest) .. mlxd.log.1 .. mlxd.log (newest), plus files that are not logs."""
    d = tmp_path / "logs"
    d.mkdir()
    (d / "mlxd.log.2").write_text(
        event("40:00", "info", "server.starting", port=8765)
        + "\n"
        + event("40:01", "debug", "engine.step", batch=1)
        + "\n"
    )
    (d / "mlxd.log.1").write_text(
        event("41:00", "warning", "model.slow", message_text="took long") + "\n" + GARBAGE + "\n"
    )
    (d / "mlxd.log").write_text(
        REQUEST
        + "\n"
        + event("42:30", "error", "request.failed", request_id="req_xyz", error="boom")
        + "\n"
        + "\n"
    )
    (d / "mlxd.log.bak").write_text("not a rotation\n")
    return d


def args(**kw: Any) -> argparse.Namespace:
    base = {
        "follow": False,
        "json": False,
        "level": None,
        "request_id": None,
        "event": None,
        "lines": 50,
    }
    return argparse.Namespace(**{**base, **kw})


def settings_for(log_dir: Path) -> Settings:
    return Settings(logging=LoggingSettings(file=str(log_dir / "mlxd.log")))


def shown(capsys: pytest.CaptureFixture[str], log_dir: Path, **kw: Any) -> list[str]:
    assert run(settings_for(log_dir), args(**kw)) == 0
    return capsys.readouterr().out.splitlines()


def test_request_line_is_summarised_and_aligned() -> None:
    """request.completed renders as method, path, status, duration, model, tokens, id."""
    assert format_line(REQUEST, tz=UTC) == (
        "2026-11-25 01:42:24 INFO  request.completed    POST /v1/chat/completions 200 1662ms "
        "model=SmolLM2 tokens=37/7 stream=true id=req_abc"
    )


def test_other_events_show_fields_as_key_value() -> None:
    """Other events print their fields as key=value (quoted when needed, None left out), the
    stdlib message as text, and a traceback indented below."""
    line = json.dumps(
        {
            "timestamp": "2026-11-25T01:00:00Z",
            "level": "warning",
            "event": "hypercorn.log",
            "message": "Running on http://x",
            "detail": "two words",
            "none": None,
            "n": 3,
            "exception": "Traceback:\n  boom",
        }
    )
    assert format_line(line, tz=UTC) == (
        "2026-11-25 01:00:00 WARN  hypercorn.log        Running on http://x "
        'detail="two words" n=3\n    Traceback:\n      boom'
    )


def test_garbage_passes_through_and_colors_only_when_asked() -> None:
    """A line that is not JSON comes back unchanged; ANSI colors appear only with color=True."""
    assert format_line(GARBAGE + "\n") == GARBAGE
    assert format_line("[1, 2]") == "[1, 2]"
    assert "\x1b[" in format_line(REQUEST, color=True)
    assert "\x1b[" not in format_line(REQUEST)


def test_rotated_files_are_read_oldest_first(tmp_path: Path) -> None:
    """History order is mlxd.log.10, ..., mlxd.log.2, mlxd.log.1, mlxd.log (numeric, not
    lexical), and files such as mlxd.log.bak are not logs."""
    for name in ("mlxd.log", "mlxd.log.1", "mlxd.log.2", "mlxd.log.10", "mlxd.log.bak"):
        (tmp_path / name).write_text("x\n")
    assert [p.name for p in log_files(tmp_path / "mlxd.log")] == [
        "mlxd.log.10",
        "mlxd.log.2",
        "mlxd.log.1",
        "mlxd.log",
    ]


def test_history_spans_rotated_files_in_order_and_n_keeps_the_newest(
    capsys: pytest.CaptureFixture[str], log_dir: Path
) -> None:
    """All lines come oldest first across rotated files (blank lines dropped, garbage kept);
    -n keeps only the newest ones."""
    out = shown(capsys, log_dir)
    assert [ln.split()[3] if ln[:4] == "2026" else ln for ln in out] == [
        "server.starting",
        "engine.step",
        "model.slow",
        GARBAGE,
        "request.completed",
        "request.failed",
    ]
    out = shown(capsys, log_dir, lines=2)
    assert [ln.split()[3] for ln in out] == ["request.completed", "request.failed"]
    assert shown(capsys, log_dir, lines=0) == []


def test_json_passes_raw_lines(capsys: pytest.CaptureFixture[str], log_dir: Path) -> None:
    """--json prints the file's lines byte for byte (garbage included), filtered as asked."""
    assert shown(capsys, log_dir, json=True, lines=3) == [
        GARBAGE,
        REQUEST,
        event("42:30", "error", "request.failed", request_id="req_xyz", error="boom"),
    ]
    assert shown(capsys, log_dir, json=True, request_id="req_abc") == [REQUEST]


def test_filters_level_request_id_and_event_prefix(
    capsys: pytest.CaptureFixture[str], log_dir: Path
) -> None:
    """--level keeps that level and above (garbage too: it may be a crash); --request-id and
    --event match exactly / by prefix and drop lines they cannot match."""
    names = lambda out: [ln.split()[3] if ln[:4] == "2026" else ln for ln in out]  # noqa: E731
    assert names(shown(capsys, log_dir, level="WARNING")) == [
        "model.slow",
        GARBAGE,
        "request.failed",
    ]
    assert names(shown(capsys, log_dir, request_id="req_xyz")) == ["request.failed"]
    assert names(shown(capsys, log_dir, event="request.")) == [
        "request.completed",
        "request.failed",
    ]
    assert names(shown(capsys, log_dir, event="request.", level="error")) == ["request.failed"]


def test_unknown_level_and_missing_file_are_clear_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, log_dir: Path
) -> None:
    """An unknown --level exits 2 naming the valid ones; no log file at all exits 1."""
    assert run(settings_for(log_dir), args(level="loud")) == 2
    assert "debug, info, warning, error" in capsys.readouterr().err
    assert run(settings_for(tmp_path / "nothing"), args()) == 1
    assert "no log file" in capsys.readouterr().err


def test_filters_ignore_blank_lines() -> None:
    """Blank lines never match, whatever the filters."""
    assert not Filters().match("\n")
    assert Filters().match(GARBAGE)


def test_follow_reads_appends_partial_lines_rotation_and_truncation(tmp_path: Path) -> None:
    """Following returns appended lines in order, holds a partial line until it is complete,
    drains the old file on rotation then reads the new one, and restarts after truncation."""
    path = tmp_path / "mlxd.log"
    path.write_text("old-1\n")
    follower = Follower(path)
    assert follower.poll() == ["old-1"]  # the history read leaves it at the end
    got: list[str] = []
    stop = threading.Event()
    thread = threading.Thread(
        target=follow, args=(follower, got.append), kwargs={"interval": 0.01, "stop": stop}
    )
    thread.start()

    def wait_for(n: int) -> None:
        deadline = time.monotonic() + 10
        while len(got) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(got) >= n, got

    try:
        with path.open("a") as fh:
            fh.write("a\nb-par")
            fh.flush()
            wait_for(1)
            fh.write("t\n")
        wait_for(2)
        with path.open("a") as fh:
            fh.write("last-in-old\n")
        path.rename(tmp_path / "mlxd.log.1")  # rotation, as RotatingFileHandler does it
        path.write_text("new-1\n")
        wait_for(4)
        with path.open("a") as fh:
            fh.write("new-2\n")
        wait_for(5)
        path.write_text("t1\n")  # truncated and rewritten, shorter than before
        wait_for(6)
    finally:
        stop.set()
        thread.join(5)
        follower.close()
    assert got == ["a", "b-part", "last-in-old", "new-1", "new-2", "t1"]


def test_follow_stops_after_max_polls_and_waits_for_a_missing_file(tmp_path: Path) -> None:
    """With no file yet, following polls quietly; max_polls bounds it; a file that appears
    later is read from its start."""
    path = tmp_path / "mlxd.log"
    follower = Follower(path)
    got: list[str] = []
    follow(follower, got.append, interval=0.001, max_polls=3)
    assert got == []
    path.write_text("first\n")
    follow(follower, got.append, interval=0.001, max_polls=1)
    follower.close()
    assert got == ["first"]


def test_mlxd_logs_command_end_to_end(log_dir: Path, tmp_path: Path) -> None:
    """`mlxd logs` on the command line reads the configured log file and applies filters."""
    config = tmp_path / "mlxd.toml"
    config.write_text(f'[logging]\nfile = "{log_dir / "mlxd.log"}"\n')
    proc = run_mlxd(
        "--config", str(config), "logs", "--json", "-n", "5", "--event", "request.completed"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [REQUEST]
