"""benchmarks/gpu_check.py's CPU dry run (`--device cpu --tiny`): the Triton kernel, run by Triton's interpreter,
matches grid_sample, and `Trainer.run_step` trains every configuration the GPU run times."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

# find_spec, not import: importing triton here, without TRITON_INTERPRET, would fix this worker's triton to compiled
# mode for the interpreted kernel tests that may run in it later.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="needs triton, whose interpreter runs the kernel on CPU"
)

CONFIGURATIONS = {
    (k, backend, dtype) for k in (0, 2) for backend in ("pytorch", "triton") for dtype in ("fp32", "bf16")
}


def test_gpu_check_dry_run_matches_grid_sample_and_steps_every_configuration(tmp_path):
    out = tmp_path / "x.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny"]
    command += ["--out", str(out), "--skip-pipeline"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())

    parity = report["kernel_parity"]
    fp32 = parity["fp32"]
    assert fp32["max_abs_diff_output"] < 1e-4, fp32
    # The gradients reach the hundreds at these sizes: float32 agreement is judged relative to their scale.
    relative = {key: value for key, value in fp32.items() if key.startswith("max_rel_diff_")}
    assert len(relative) == 4, fp32
    assert all(value < 1e-4 for value in relative.values()), relative
    bf16 = {key: value for key, value in parity["bf16"].items() if key.startswith("max_rel_diff_")}
    # A few of bfloat16's rounding steps (2**-7 relative), not a wrong sample.
    assert all(value < 3e-2 for value in bf16.values()), bf16

    rows = {(row["K"], row["backend"], row["dtype"]): row for row in report["training_steps"]}
    assert set(rows) == CONFIGURATIONS
    assert len(report["training_steps"]) == len(CONFIGURATIONS)
    for row in rows.values():
        assert math.isfinite(row["seconds_per_step"]) and row["seconds_per_step"] > 0, row
    assert "pipeline" not in report
