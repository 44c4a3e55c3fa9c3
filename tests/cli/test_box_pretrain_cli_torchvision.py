"""`python run.py experiment=smoke stage=box_pretrain model=fcos|retinanet|faster_rcnn` (torchvision detectors)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import CONF_DIR, run_cli

TORCHVISION_MODELS = [
    pytest.param(
        name,
        marks=pytest.mark.skipif(
            not (CONF_DIR / "model" / f"{name}.yaml").is_file(), reason=f"conf/model/{name}.yaml does not exist yet"
        ),
    )
    for name in ("fcos", "retinanet", "faster_rcnn")
]


@pytest.mark.parametrize("model", TORCHVISION_MODELS)
def test_box_pretrain_runs_for_torchvision_detectors(tmp_path, data_dir, model):
    proc = run_cli(["experiment=smoke", "stage=box_pretrain", f"model={model}"], tmp_path, data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "box_pretrain"
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["stage"] == "box_pretrain" and ckpt["drop_keys"]
    assert not any(k.startswith(("projectors.", "momentum_")) for k in ckpt["model"])
    assert any(k.startswith("backbone.body.") for k in ckpt["model"])
    summary = json.loads((out / "summary.json").read_text())
    assert any(k.startswith("align/loss_contrastive_") for k in summary["metrics"])
    assert summary["proposals"]["images_per_second"] > 0
