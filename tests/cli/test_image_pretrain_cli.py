"""`python run.py stage=image_pretrain` for each method, and the backbone it hands to the next stage."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision

from tests.helpers import run_cli


@pytest.mark.parametrize(
    ("method", "extra", "expected_input"),
    [
        ("self_supervised", [], "train_proposals"),  # the default: MoCo v3 on proposal crops
        (
            "self_supervised",
            ["stage.self_supervised.algorithm=byol", "stage.self_supervised.views=images"],
            "train_images",
        ),
        ("supervised", [], "ground_truth_crops"),
    ],
)
def test_image_pretrain_trains_a_backbone_checkpoint(method, extra, expected_input, tmp_path, data_dir):
    proc = run_cli(["experiment=smoke", "stage=image_pretrain", f"stage.method={method}", *extra], tmp_path, data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "image_pretrain" / "checkpoint.pth", weights_only=True)
    assert ckpt["stage"] == "image_pretrain"
    assert ckpt["model"] and all(k.startswith("backbone.body.") for k in ckpt["model"])
    summary = json.loads((tmp_path / "image_pretrain" / "summary.json").read_text())
    assert summary["iterations"] == 6 and summary["method"] == method
    assert summary["input"] == expected_input
    if method == "self_supervised":
        assert summary["algorithm"] == ("byol" if extra else "mocov3") and summary["num_items"] > 0


def test_imported_torchvision_weights_reach_finetune(tmp_path, data_dir):
    resnet = torchvision.models.resnet18(weights=None)
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    proc = run_cli(
        [
            "experiment=smoke",
            "stage=image_pretrain",
            "stage.method=import",
            f"stage.weights={tmp_path / 'resnet18.pth'}",
        ],
        tmp_path,
        data_dir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "image_pretrain" / "checkpoint.pth", weights_only=True)
    assert torch.equal(ckpt["model"]["backbone.body.conv1.weight"], resnet.state_dict()["conv1.weight"])

    proc = run_cli(
        ["experiment=smoke", "stage=finetune", f"stage.init_from={tmp_path / 'image_pretrain'}"], tmp_path, data_dir
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    init = json.loads((tmp_path / "finetune" / "summary.json").read_text())["init"]
    assert init["loaded"]["backbone"] == len(ckpt["model"]) and not init["skipped_shape"]


def test_import_of_a_wrong_architecture_is_one_line(tmp_path, data_dir):
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "r50.pth")
    proc = run_cli(
        ["experiment=smoke", "stage=image_pretrain", "stage.method=import", f"stage.weights={tmp_path / 'r50.pth'}"],
        tmp_path,
        data_dir,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error: ")][0].count("r50.pth") == 1
