"""Mixed precision and torch.compile run on CPU: a bf16 smoke finetune has finite losses; a compiled one trains and
its checkpoint keeps the model's own state-dict names."""

from __future__ import annotations

import json
import math

import torch

from tests.helpers import assert_one_line_error, run_cli

FINETUNE = ["experiment=smoke", "stage=finetune", "trainer.max_iters=3", "stage.evaluate=false", "trainer.log_every=1"]


def test_bf16_autocast_finetunes_with_finite_losses_on_cpu(tmp_path, data_dir):
    proc = run_cli([*FINETUNE, "trainer.amp_dtype=bf16"], tmp_path, data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = [json.loads(line) for line in (tmp_path / "finetune" / "metrics.jsonl").read_text().splitlines()]
    assert [line["iter"] for line in logged] == [1, 2, 3]
    assert all(math.isfinite(v) for line in logged for k, v in line.items() if "loss" in k)


def test_compiled_modules_train_and_keep_the_checkpoint_names(tmp_path, data_dir):
    # The neck alone: the smallest graph, so the compilation fits the test budget (the default compiles the
    # backbone, neck and transformer).
    proc = run_cli(
        [*FINETUNE, "trainer.compile=true", "trainer.compile_modules=[neck]"], tmp_path, data_dir, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch.compile: ['neck']" in proc.stdout + proc.stderr
    state = torch.load(tmp_path / "finetune" / "checkpoint.pth", weights_only=True)["model"]
    assert any(key.startswith("neck.") for key in state) and not any("_orig_mod" in key for key in state)


def test_an_unknown_compile_module_is_one_line(tmp_path, data_dir):
    proc = run_cli([*FINETUNE, "trainer.compile=true", "trainer.compile_modules=[nothing]"], tmp_path, data_dir)
    assert_one_line_error(proc, "trainer.compile_modules", "nothing")
