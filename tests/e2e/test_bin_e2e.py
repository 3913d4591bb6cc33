"""The README's run command itself: bin/mlxd bootstraps, passes its arguments on, serves."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from conftest import ROOT, Daemon, free_port, run_command
from mlxd.bench.harness import child_env


def test_bin_mlxd_serves_the_bundled_model(tmp_path: Path) -> None:
    """`bin/mlxd --config X` syncs the locked environment (a no-op here), starts, and answers
    the capital question with Paris; SIGTERM ends it with status 0."""
    port = free_port()
    config = tmp_path / "mlxd.toml"
    config.write_text(f'[server]\nport = {port}\nstate_dir = "{tmp_path / "state"}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXD_")}
    stderr = tmp_path / "stderr.log"
    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            [str(ROOT / "bin" / "mlxd"), "--config", str(config)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    d = Daemon(
        name="bin/mlxd",
        port=port,
        process=proc,
        log=stderr,
        command=proc.args,
        state_dir=tmp_path / "state",
        config_path=config,
        env=env,
    )
    try:
        health = d.wait_ready(timeout=180)
        assert health["model"]["id"] == "SmolLM2-135M-Instruct"
        reply = d.client().chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
        )
        assert "Paris" in (reply.choices[0].message.content or "")
        assert d.stop(signal.SIGTERM) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_bin_mlxd_passes_arguments_on(tmp_path: Path) -> None:
    """`bin/mlxd --config <bad file> check-config` reaches mlxd: exit 78 with the key path."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nprot = 1\n")
    result = run_command(
        [str(ROOT / "bin" / "mlxd"), "--config", str(bad), "check-config"],
        env=child_env(),
        timeout=180,
    )
    assert result.returncode == 78
    assert "server.prot: unknown key" in result.stderr
