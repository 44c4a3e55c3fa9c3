"""`python run.py experiment=smoke model=co_deformable_detr model.num_aux_heads=K stage=finetune` for K = 0..4 as
one sweep (every K trains and logs its head-prefixed losses), then `stage=eval` of the K=4 checkpoint, which
runs as the plain DETR."""

from __future__ import annotations

import json

import torch

from stages.report import find_job_dirs
from tests.helpers import assert_one_line_error, run_cli

HEADS = ["atss", "faster_rcnn", "retinanet", "fcos"]
SMOKE_CO_DETR = ["experiment=smoke", "model=co_deformable_detr"]


def test_smoke_finetune_runs_for_every_number_of_auxiliary_heads_and_evaluates_as_the_plain_detr(tmp_path, data_dir):
    sweep_dir = tmp_path / "sweep"
    args = [*SMOKE_CO_DETR, "stage=finetune", "++stage.evaluate=false", "trainer.max_iters=2"]
    proc = run_cli(
        ["-m", *args, "model.num_aux_heads=0,1,2,3,4", f"hydra.sweep.dir={sweep_dir}"], tmp_path / "unused", data_dir
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = find_job_dirs(sweep_dir)
    assert len(jobs) == 5
    for k, job in enumerate(jobs):
        assert f"model.num_aux_heads={k}" in (job / ".hydra" / "overrides.yaml").read_text()
        logged = json.loads((job / "finetune" / "metrics.jsonl").read_text().splitlines()[-1])
        prefixes = {key.split("/")[0] for key in logged if "/" in key}
        expected = {"detr"} | {f"aux{i}_{h}{s}" for i, h in enumerate(HEADS[:k]) for s in ("", "_queries")}
        assert prefixes == expected, (k, prefixes)
        state = torch.load(job / "finetune" / "checkpoint.pth", weights_only=True)["model"]
        assert any(key.startswith(f"aux_heads.{k - 1}.") for key in state) == (k > 0)

    job = jobs[4]
    proc = run_cli([*SMOKE_CO_DETR, "model.num_aux_heads=4", "stage=eval"], job, data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bbox = json.loads((job / "eval" / "metrics.json").read_text())["bbox"]
    assert 0.0 <= bbox["AP"] <= 100.0
    report = next(line for line in proc.stderr.splitlines() + proc.stdout.splitlines() if "aux_heads" in line)
    skipped_by_name = int(report.split()[3])  # module, loaded, shape, name, ... (LoadReport.table)
    assert skipped_by_name > 0 and int(report.split()[1]) == 0


def test_an_out_of_range_k_is_one_line_at_start_up(tmp_path, data_dir):
    proc = run_cli([*SMOKE_CO_DETR, "model.num_aux_heads=5", "stage=finetune"], tmp_path, data_dir / "never_created")
    assert_one_line_error(proc, "model.num_aux_heads")
    assert not (data_dir / "never_created").exists()  # before any data is read
