"""stage=export: the smoke Co-DETR (as its plain DETR, any size) and the three torchvision detectors (one fixed
size) in ONNX Runtime give PyTorch's scores and boxes; stage=eval of the exported model gives the checkpoint's
predictions; files that are not ours are refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from models.deploy import DeployedDetector
from stages.api import load_detector
from tests.helpers import assert_one_line_error, run_cli

FINETUNE = ["experiment=smoke", "stage=finetune", "trainer.max_iters=2", "stage.evaluate=false"]


def finetune_and_export(root: Path, data_dir: Path, model: str) -> Path:
    proc = run_cli([*FINETUNE, f"model={model}"], root / "train", data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli(
        ["experiment=smoke", f"model={model}", "stage=export", f"stage.init_from={root / 'train'}"],
        root / "export",
        data_dir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def exported_detr(tmp_path_factory, data_dir) -> Path:
    return finetune_and_export(tmp_path_factory.mktemp("detr"), data_dir, "co_deformable_detr")


def val_images(data_dir: Path, count: int) -> list[np.ndarray]:
    files = sorted((data_dir / "synthetic" / "val").glob("*.png"))[:count]
    return [cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB) for f in files]


def onnx_and_torch(root: Path, images: list[np.ndarray]):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(root / "export" / "export" / "model.onnx"))
    wrapper = DeployedDetector(load_detector(root / "train").model).eval()
    for rgb in images:
        batch = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
        with torch.no_grad():
            expected = [t.numpy() for t in wrapper(batch)]
        yield rgb.shape[:2], session.run(None, {"images": batch.numpy()}), expected


def test_the_exported_detr_matches_pytorch_on_images_of_several_sizes(exported_detr, data_dir):
    info = json.loads((exported_detr / "export" / "export" / "model.json").read_text())
    assert info["input"]["dynamic_size"] and info["architecture"] == "CoDeformableDETR"
    assert [c["id"] for c in info["categories"]] == [1, 3, 5, 7, 9]
    sizes = set()
    for (h, w), got, expected in onnx_and_torch(exported_detr, val_images(data_dir, 3)):
        sizes.add((h, w))
        np.testing.assert_allclose(got[0], expected[0], atol=1e-4)
        np.testing.assert_array_equal(got[1], expected[1])
        np.testing.assert_allclose(got[2], expected[2], atol=1e-3 * max(h, w))
        assert got[1].dtype == np.int64 and got[2].shape == (1, expected[2].shape[1], 4)
    assert len(sizes) > 1  # the synthetic images differ in size: one graph takes them all
    import onnx

    graph = onnx.load(str(exported_detr / "export" / "export" / "model.onnx"))
    assert graph.opset_import[0].version >= 17
    assert not any("aux" in init.name for init in graph.graph.initializer)  # no auxiliary head in the graph


def test_eval_of_the_exported_model_equals_eval_of_the_checkpoint(exported_detr, data_dir):
    predictions = {}
    for name, source in (
        ("torch", exported_detr / "train"),
        ("onnx", exported_detr / "export" / "export" / "model.onnx"),
    ):
        run_dir = exported_detr / f"eval_{name}"
        args = ["experiment=smoke", "stage=eval", f"stage.init_from={source}", "stage.batch_size=1"]
        proc = run_cli(args, run_dir, data_dir)
        assert proc.returncode == 0, proc.stderr[-3000:]
        predictions[name] = json.loads((run_dir / "eval" / "predictions.json").read_text())
        metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())["bbox"]
        predictions[name + "_ap"] = metrics["AP"]
    assert abs(predictions["torch_ap"] - predictions["onnx_ap"]) <= 0.1
    torch_preds, onnx_preds = predictions["torch"], predictions["onnx"]
    assert len(torch_preds) == len(onnx_preds) > 0
    for a, b in zip(torch_preds, onnx_preds, strict=True):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert abs(a["score"] - b["score"]) <= 1e-4
        np.testing.assert_allclose(a["bbox"], b["bbox"], atol=0.05)


@pytest.mark.parametrize("model", ["fcos", "retinanet", "faster_rcnn"])
def test_torchvision_detectors_export_at_a_fixed_size_and_match_pytorch(tmp_path, data_dir, model):
    root = finetune_and_export(tmp_path, data_dir, model)
    info = json.loads((root / "export" / "export" / "model.json").read_text())
    assert not info["input"]["dynamic_size"] and info["input"]["size"] == [320, 320]
    check = info["checks"][0]
    assert check["max_score_diff"] <= 1e-4 and check["labels_equal"] and check["max_box_diff_px"] <= 0.32


def test_an_onnx_file_that_is_not_ours_is_refused_in_one_line(exported_detr, data_dir, tmp_path):
    foreign = tmp_path / "model.onnx"
    foreign.write_bytes((exported_detr / "export" / "export" / "model.onnx").read_bytes())
    proc = run_cli(["experiment=smoke", "stage=eval", f"stage.init_from={foreign}"], tmp_path / "run", data_dir)
    assert_one_line_error(proc, "model.json", "not found", "stage=export")
    (tmp_path / "model.json").write_text(json.dumps({"format": "something else"}))
    proc = run_cli(["experiment=smoke", "stage=eval", f"stage.init_from={foreign}"], tmp_path / "run", data_dir)
    assert_one_line_error(proc, "model.json", "'format' is not")
