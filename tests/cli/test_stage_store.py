"""The stage store end to end: a pipeline re-run after a change recomputes exactly the stages downstream of it,
two jobs that need one stage compute it once, a changed config never resumes or reuses a stale stage, and the
bad inputs of the hand-off between stages end in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, assert_one_line_error, run_cli

STAGES = ["image_pretrain", "box_pretrain", "finetune", "eval"]
# The smoke pipeline with fewer steps: checkpoints of the smoke model are large and written with fsync.
PIPELINE = ["experiment=smoke", "trainer.max_iters=2", "trainer.checkpoint_every=100"]


def statuses(run_dir: Path) -> dict[str, str]:
    record = json.loads((run_dir / "pipeline.json").read_text())
    return {stage["name"]: stage["status"] for stage in record["stages"]}


def run_pipeline(run_dir: Path, data_dir: Path, store: Path, *extra: str):
    proc = run_cli([*PIPELINE, *extra, f"paths.output_dir={store}"], run_dir, data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((run_dir / "pipeline.json").read_text())


def test_a_rerun_after_a_change_recomputes_exactly_the_stages_downstream_of_it(tmp_path, data_dir):
    store = tmp_path / "outputs"
    first = run_pipeline(tmp_path / "a", data_dir, store)
    assert statuses(tmp_path / "a") == dict.fromkeys(STAGES, "computed")
    for stage in first["stages"][:3]:
        link = tmp_path / "a" / stage["name"]
        assert link.is_symlink() and link.resolve() == Path(stage["directory"])
        assert Path(stage["directory"]).parent.parent == store / "stages" and len(stage["fingerprint"]) == 64
        fingerprint = json.loads((link / "fingerprint.json").read_text())
        assert fingerprint["fingerprint"] == stage["fingerprint"] and "trainer.optimizer.lr" in fingerprint["config"]

    changed = run_pipeline(tmp_path / "b", data_dir, store, 'stage.overrides.box_pretrain=["trainer.max_iters=3"]')
    assert statuses(tmp_path / "b") == {
        "image_pretrain": "reused",
        "box_pretrain": "computed",
        "finetune": "computed",
        "eval": "computed",
    }
    # The old entries stay; the image_pretrain entry is shared.
    assert first["stages"][0]["directory"] == changed["stages"][0]["directory"]
    assert all(Path(stage["directory"]).is_dir() for stage in first["stages"] + changed["stages"])
    assert first["stages"][1]["fingerprint"] != changed["stages"][1]["fingerprint"]

    # The same command again in the same run directory: everything reused, nothing recomputed.
    again = run_pipeline(tmp_path / "a", data_dir, store)
    assert statuses(tmp_path / "a") == dict.fromkeys(STAGES, "reused")
    assert [s["fingerprint"] for s in again["stages"]] == [s["fingerprint"] for s in first["stages"]]


@pytest.mark.slow
def test_a_sweep_shares_the_stages_that_do_not_read_the_swept_key(tmp_path, data_dir):
    store = tmp_path / "outputs"
    first = run_pipeline(tmp_path / "a", data_dir, store)
    # The sweep's other value of K: the image backbone is shared, box_pretrain (which reads K) is not.
    other_k = run_pipeline(tmp_path / "c", data_dir, store, "model.num_aux_heads=1")
    assert statuses(tmp_path / "c")["image_pretrain"] == "reused"
    assert statuses(tmp_path / "c")["box_pretrain"] == "computed"
    # The label fraction is read by finetune only (with an image backbone that reads no labels either).
    unlabelled = ['stage.overrides.image_pretrain=["stage.method=self_supervised","trainer.max_iters=2"]']
    ssl_full = run_pipeline(tmp_path / "e", data_dir, store, *unlabelled)
    ssl_half = run_pipeline(tmp_path / "f", data_dir, store, *unlabelled, "data.fraction=0.5")
    assert [s["status"] for s in ssl_half["stages"]] == ["reused", "reused", "computed", "computed"]
    assert [s["directory"] for s in ssl_half["stages"][:2]] == [s["directory"] for s in ssl_full["stages"][:2]]
    assert other_k["stages"][0]["directory"] == first["stages"][0]["directory"]


def test_two_jobs_that_need_the_same_stages_compute_each_once(tmp_path, data_dir):
    store = tmp_path / "outputs"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    jobs = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "run.py"),
                *PIPELINE,
                f"hydra.run.dir={tmp_path / name}",
                f"paths.data_dir={data_dir}",
                f"paths.output_dir={store}",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("x", "y")
    ]
    for job in jobs:
        _, stderr = job.communicate(timeout=600)
        assert job.returncode == 0, stderr[-3000:]
    x, y = statuses(tmp_path / "x"), statuses(tmp_path / "y")
    for stage in STAGES[:3]:
        assert sorted([x[stage], y[stage]]) == ["computed", "reused"], stage
    assert x["eval"] == y["eval"] == "computed"  # eval lives in each run directory
    assert len([p for p in (store / "stages" / "box_pretrain").iterdir() if p.is_dir()]) == 1


def test_a_finished_stage_rerun_with_other_settings_stops_naming_the_keys(tmp_path, data_dir):
    args = ["experiment=smoke", "stage=finetune", "trainer.max_iters=2", "stage.evaluate=false"]
    proc = run_cli(args, tmp_path, data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli([*args, "trainer.optimizer.lr=0.5", "model.num_aux_heads=1"], tmp_path, data_dir)
    assert_one_line_error(proc, "finetune", "model.num_aux_heads", "trainer.optimizer.lr", "use a new run directory")
    # The finished run is untouched, and the same command still finds it finished.
    proc = run_cli(args, tmp_path, data_dir)
    assert proc.returncode == 0 and "already finished" in proc.stdout + proc.stderr


def test_eval_refuses_a_checkpoint_whose_class_head_never_saw_labels(tmp_path, data_dir):
    proc = run_cli(["experiment=smoke", "stage=box_pretrain", "trainer.max_iters=2"], tmp_path, data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    box = tmp_path / "box_pretrain"
    proc = run_cli(["experiment=smoke", "stage=eval", f"stage.init_from={box}"], tmp_path / "eval", data_dir)
    assert_one_line_error(proc, "box_pretrain", "records no categories", "stage.allow_untrained_head=true")
    allowed = ["experiment=smoke", "stage=eval", f"stage.init_from={box}", "stage.allow_untrained_head=true"]
    assert run_cli(allowed, tmp_path / "eval", data_dir).returncode == 0


def test_eval_refuses_a_checkpoint_trained_on_other_categories(tmp_path, data_dir):
    proc = run_cli(["experiment=smoke", "stage=finetune", "trainer.max_iters=2"], tmp_path, data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "finetune" / "checkpoint.pth", weights_only=True)
    assert [c["name"] for c in checkpoint["categories"]] == ["circle", "square", "triangle", "cross", "ring"]
    checkpoint["categories"][0]["name"] = "disc"
    torch.save(checkpoint, tmp_path / "renamed.pth")
    proc = run_cli(
        ["experiment=smoke", "stage=eval", f"stage.init_from={tmp_path / 'renamed.pth'}"], tmp_path, data_dir
    )
    assert_one_line_error(proc, "renamed.pth", "only in the checkpoint: [(1, 'disc')]")


def test_a_crafted_checkpoint_is_refused_in_one_line(tmp_path, data_dir):
    torch.save({"model": {}, "run": print}, tmp_path / "crafted.pth")  # unpickling it would import a callable
    proc = run_cli(
        ["experiment=smoke", "stage=eval", f"stage.init_from={tmp_path / 'crafted.pth'}"], tmp_path, data_dir
    )
    assert_one_line_error(proc, "crafted.pth", "refused")


def test_a_training_set_smaller_than_one_batch_stops_before_training(tmp_path, data_dir):
    proc = run_cli(["experiment=smoke", "stage=finetune", "data.limit_train_images=1"], tmp_path, data_dir)
    assert_one_line_error(proc, "data.limit_train_images=1", "1 training items", "trainer.batch_size x processes")


def test_cuda_without_a_gpu_is_one_line(tmp_path, data_dir):
    proc = run_cli(["experiment=smoke", "stage=finetune", "trainer.device=cuda"], tmp_path, data_dir)
    assert_one_line_error(proc, "trainer.device", "no CUDA device")
