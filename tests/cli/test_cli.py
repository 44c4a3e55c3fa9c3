"""`python run.py ...` end to end: the output contract (README, "Outputs") and one-line errors for bad input."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, data_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("smoke_run")
    proc = run_cli(["experiment=smoke"], run_dir, data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_smoke_pipeline_writes_every_file_of_the_output_contract(smoke_run):
    run_dir = smoke_run
    for rel in [
        ".hydra/config.yaml",
        ".hydra/overrides.yaml",
        "pipeline.json",
        "image_pretrain/checkpoint.pth",
        "box_pretrain/checkpoint.pth",
        "finetune/checkpoint.pth",
        "finetune/last.pth",
        "finetune/metrics.jsonl",
        "finetune/summary.json",
        "eval/metrics.json",
        "eval/predictions.json",
        "eval/summary.json",
    ]:
        assert (run_dir / rel).is_file(), rel
    assert list((run_dir / "eval" / "vis").glob("*.png"))

    pipeline = json.loads((run_dir / "pipeline.json").read_text())
    assert [s["name"] for s in pipeline["stages"]] == ["image_pretrain", "box_pretrain", "finetune", "eval"]
    assert all(s["status"] == "computed" for s in pipeline["stages"])
    assert all(len(s["sha256"]) == 64 for s in pipeline["stages"][:3])
    # each training stage started from the previous one's checkpoint
    box_init = json.loads((run_dir / "box_pretrain" / "summary.json").read_text())["init"]
    assert box_init["loaded"]["backbone"] > 0
    finetune_init = json.loads((run_dir / "finetune" / "summary.json").read_text())["init"]
    assert {"backbone", "neck", "transformer"} <= set(finetune_init["loaded"])

    ckpt = torch.load(run_dir / "finetune" / "checkpoint.pth", weights_only=True)
    assert {"model", "optimizer", "scheduler", "iter", "stage", "config", "categories", "fingerprint"} <= set(ckpt)
    assert ckpt["stage"] == "finetune" and ckpt["iter"] == ckpt["config"]["trainer"]["max_iters"]

    first = json.loads((run_dir / "finetune" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"iter", "loss", "lr", "sec_per_iter"} <= set(first)

    bbox = json.loads((run_dir / "eval" / "metrics.json").read_text())["bbox"]
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl", "per_class"} <= set(bbox)
    assert all(0.0 <= bbox[k] <= 100.0 for k in ("AP", "AP50", "AP75"))

    summary = json.loads((run_dir / "finetune" / "summary.json").read_text())
    assert {"stage", "checkpoint", "metrics", "seconds"} <= set(summary)

    gt = json.loads((Path(ckpt["config"]["data"]["root"]) / ckpt["config"]["data"]["val_json"]).read_text())
    cat_ids = {c["id"] for c in gt["categories"]}
    predictions = json.loads((run_dir / "eval" / "predictions.json").read_text())
    assert predictions and {p["category_id"] for p in predictions} <= cat_ids
    assert {"image_id", "category_id", "bbox", "score"} <= set(predictions[0])


def test_rerunning_a_finished_pipeline_reuses_its_stages(smoke_run, data_dir):
    proc = run_cli(["experiment=smoke"], smoke_run, data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pipeline = json.loads((smoke_run / "pipeline.json").read_text())
    assert {s["status"] for s in pipeline["stages"]} == {"reused"}


def test_eval_accepts_a_stage_directory_as_init_from(smoke_run, data_dir, tmp_path):
    proc = run_cli(["experiment=smoke", "stage=eval", f"stage.init_from={smoke_run / 'finetune'}"], tmp_path, data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    theirs = json.loads((smoke_run / "eval" / "metrics.json").read_text())
    assert ours == theirs


def test_unknown_stage_is_refused_in_one_line(tmp_path, data_dir):
    proc = run_cli(["stage=nonsense"], tmp_path, data_dir)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "stage/nonsense" in proc.stderr


def test_bad_override_is_refused_without_traceback(tmp_path, data_dir):
    proc = run_cli(["trainer.no_such_key=1"], tmp_path, data_dir)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "no_such_key" in proc.stderr


def test_missing_checkpoint_is_one_line(tmp_path, data_dir):
    proc = run_cli(["experiment=smoke", "stage=eval", f"stage.init_from={tmp_path / 'nope.pth'}"], tmp_path, data_dir)
    assert_one_line_error(proc, "nope.pth", "checkpoint not found")


def test_checkpoint_of_another_model_is_one_line(tmp_path, data_dir):
    torch.save({"model": {"classifier.weight": torch.zeros(3, 3)}, "stage": "x"}, tmp_path / "other.pth")
    proc = run_cli(["experiment=smoke", "stage=eval", f"stage.init_from={tmp_path / 'other.pth'}"], tmp_path, data_dir)
    assert_one_line_error(proc, "other.pth", "fit the model")


def write_coco(root: Path, annotations_text: str | None = None, with_image: bool = True) -> Path:
    import numpy as np
    from PIL import Image

    (root / "images").mkdir(parents=True, exist_ok=True)
    if with_image:
        Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(root / "images" / "a.png")
    dataset = {
        "images": [{"id": 1, "file_name": "a.png", "width": 48, "height": 32}],
        "categories": [{"id": 5, "name": "thing"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [4, 4, 10, 10], "area": 100, "iscrowd": 0}],
    }
    text = annotations_text if annotations_text is not None else json.dumps(dataset)
    (root / "train.json").write_text(text)
    shutil.copy(root / "train.json", root / "val.json")
    return root


def coco_args(root: Path) -> list[str]:
    return [
        "experiment=smoke",
        "stage=finetune",
        "data=coco",
        f"data.root={root}",
        "data.train_images=images",
        "data.val_images=images",
        "data.train_json=train.json",
        "data.val_json=val.json",
        # The file holds one image: a batch of one, so that the run gets as far as reading it.
        "trainer.batch_size=1",
    ]


def test_malformed_json_is_one_line(tmp_path, data_dir):
    root = write_coco(tmp_path / "coco", annotations_text='{"images": [')
    proc = run_cli(coco_args(root), tmp_path / "run", data_dir)
    assert_one_line_error(proc, "train.json")


def test_missing_image_is_one_line(tmp_path, data_dir):
    root = write_coco(tmp_path / "coco", with_image=False)
    proc = run_cli(coco_args(root), tmp_path / "run", data_dir)
    assert_one_line_error(proc, "a.png")


def test_degenerate_box_is_one_line(tmp_path, data_dir):
    root = write_coco(tmp_path / "coco")
    bad = json.loads((root / "train.json").read_text())
    bad["annotations"][0]["bbox"] = [4, 4, -3, 10]
    (root / "train.json").write_text(json.dumps(bad))
    proc = run_cli(coco_args(root), tmp_path / "run", data_dir)
    assert_one_line_error(proc, "train.json", "annotation 1", "-3")


def test_unknown_category_is_one_line(tmp_path, data_dir):
    root = write_coco(tmp_path / "coco")
    bad = json.loads((root / "train.json").read_text())
    bad["annotations"][0]["category_id"] = 99
    (root / "train.json").write_text(json.dumps(bad))
    proc = run_cli(coco_args(root), tmp_path / "run", data_dir)
    assert_one_line_error(proc, "train.json", "99")


def test_two_process_gloo_ddp_smoke_run(tmp_path, data_dir):
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29517",
        str(ROOT / "run.py"),
    ]
    proc = run_cli(
        ["experiment=smoke", "stage=finetune", "trainer.dist_backend=gloo"],
        tmp_path,
        data_dir,
        cmd=torchrun,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "finetune" / "summary.json").read_text())
    assert summary["iterations"] == 6
    assert (tmp_path / "finetune" / "checkpoint.pth").is_file()
