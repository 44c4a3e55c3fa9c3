"""A Hydra multirun of finetune: every combination in its own job directory, each ending evaluated; the report
stage over the sweep; a re-run into the same sweep directory skips finished jobs and resumes unfinished ones.

The tests share one sweep and run in file order: the re-run test, which changes the sweep, comes last.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from stages.report import find_job_dirs, read_report_csv
from stages.sweep import job_number
from tests.helpers import run_cli

SWEEP = [
    "-m",
    "experiment=smoke",
    "stage=finetune",
    "model=co_deformable_detr",
    "model.num_aux_heads=0,1",
    "data.fraction=0.5,1.0",
    # Fewer steps and no periodic last.pth: each smoke checkpoint is ~140 MB written with fsync.
    "trainer.max_iters=2",
    "trainer.checkpoint_every=100",
]
COMBINATIONS = {("0", "0.5"), ("0", "1.0"), ("1", "0.5"), ("1", "1.0")}


def run_sweep(sweep_dir: Path, data_dir: Path):
    return run_cli([*SWEEP, f"hydra.sweep.dir={sweep_dir}"], sweep_dir, data_dir, timeout=600)


def job_dirs(sweep_dir: Path) -> list[Path]:
    return find_job_dirs(sweep_dir)


def swept_values(job: Path) -> tuple[str, str]:
    overrides = dict(o.split("=", 1) for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()))
    return overrides["model.num_aux_heads"], overrides["data.fraction"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, data_dir) -> Path:
    sweep_dir = tmp_path_factory.mktemp("sweep")
    proc = run_sweep(sweep_dir, data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep_dir


def test_sweep_runs_every_combination_in_its_own_directory_each_ending_evaluated(sweep):
    jobs = job_dirs(sweep)
    # <job number>_<hash of the job's overrides>
    assert [job_number(job.name) for job in jobs] == [0, 1, 2, 3]
    assert len({job.name.split("_")[1] for job in jobs}) == 4
    assert {swept_values(job) for job in jobs} == COMBINATIONS
    for job in jobs:
        config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        assert (str(config["model"]["num_aux_heads"]), str(config["data"]["fraction"])) == swept_values(job)
        bbox = json.loads((job / "eval" / "metrics.json").read_text())["bbox"]
        finetune = json.loads((job / "finetune" / "summary.json").read_text())
        evaluation = json.loads((job / "eval" / "summary.json").read_text())
        # The evaluation is of this job's own final checkpoint, and finetune's summary carries its AP.
        assert Path(evaluation["checkpoint"]) == job / "finetune" / "checkpoint.pth"
        assert finetune["eval"] == {k: bbox[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}


def test_report_of_the_sweep_has_a_row_per_job_a_csv_the_stdlib_reads_and_a_png(sweep, data_dir, tmp_path):
    proc = run_cli(["stage=report", f"stage.sweep_dir={sweep}"], tmp_path, data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_report_csv(tmp_path / "report" / "report.csv")
    assert len(rows) == 4
    assert {(row["model.num_aux_heads"], row["data.fraction"]) for row in rows} == COMBINATIONS
    for row in rows:
        assert row["status"] == "finished"
        assert 0.0 <= row["AP"] <= 100.0 and row["train_seconds"] > 0.0
    table = (tmp_path / "report" / "report.md").read_text()
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + 4  # header + one row per job
    assert (tmp_path / "report" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerunning_the_sweep_skips_finished_jobs_and_resumes_an_unfinished_one(sweep, data_dir):
    finished, interrupted = job_dirs(sweep)[:3], job_dirs(sweep)[3]
    mtimes = {job: (job / "finetune" / "checkpoint.pth").stat().st_mtime_ns for job in finished}
    # An interrupted job: trained to its last.pth, but neither its final checkpoint nor its evaluation written.
    (interrupted / "finetune" / "summary.json").unlink()
    (interrupted / "finetune" / "checkpoint.pth").unlink()
    shutil.rmtree(interrupted / "eval")

    proc = run_sweep(sweep, data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    for job in finished:
        assert f"already finished in {job / 'finetune'}" in output
        assert (job / "finetune" / "checkpoint.pth").stat().st_mtime_ns == mtimes[job]
    assert f"already finished in {interrupted / 'finetune'}" not in output
    assert f"resumed from {interrupted / 'finetune' / 'last.pth'}" in output
    assert (interrupted / "eval" / "metrics.json").is_file()
    assert "eval" in json.loads((interrupted / "finetune" / "summary.json").read_text())
