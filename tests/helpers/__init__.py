"""What the tests share: the repository's paths, `python run.py ...` in a subprocess, composed configs, and the
check that a user error is one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = ROOT / "conf"


def run_cli(
    args: list[str],
    run_dir: Path,
    data_dir: Path,
    timeout: int = 300,
    cmd: list[str] | None = None,
    env: dict[str, str] | None = None,
):
    """`python run.py <args>` writing into `run_dir`; returns the CompletedProcess (never raises on failure).
    `env` adds to (or replaces) the environment, e.g. {"WANDB_MODE": "offline"}; W&B is disabled otherwise.
    For a multirun (`-m`) pass `hydra.sweep.dir=...` in `args`: the appended hydra.run.dir is then unused."""
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    command = (cmd or [sys.executable, str(ROOT / "run.py")]) + [
        *args,
        f"hydra.run.dir={run_dir}",
        f"paths.data_dir={data_dir}",
    ]
    if not any(arg.startswith("paths.output_dir=") for arg in args):
        # The stage store (paths.store_dir) lives under paths.output_dir: one per test, never the repository's.
        command.append(f"paths.output_dir={run_dir}/outputs")
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def compose_config(overrides: list[str], run_dir: Path | None = None):
    """The composed config for `overrides`, with paths.run_dir set (Hydra's runtime dir is unset under compose)."""
    from hydra import compose, initialize_config_dir

    extra = [f"paths.run_dir={run_dir}"] if run_dir is not None else ["paths.run_dir=/tmp/unused"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides + extra)


def assert_one_line_error(proc, *fragments: str) -> None:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
