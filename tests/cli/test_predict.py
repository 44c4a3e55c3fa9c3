"""stage=predict and the Python API: a folder with a grayscale PNG, a non-square JPEG and a corrupt file; the
dataset's own (sparse) category ids; the API gives the same boxes as the stage; bad input in one line."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from stages.api import load_detector
from tests.helpers import assert_one_line_error, run_cli

# Every detection is written (the smoke model is barely trained), so there is something to compare.
PREDICT = ["experiment=smoke", "stage=predict", "stage.score_threshold=0.0", "stage.batch_size=2"]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, data_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("finetuned")
    proc = run_cli(
        ["experiment=smoke", "stage=finetune", "trainer.max_iters=2", "stage.evaluate=false"], run_dir, data_dir
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def images(tmp_path_factory, data_dir) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    colour = cv2.imread(str(sorted((data_dir / "synthetic" / "val").glob("*.png"))[0]))
    cv2.imwrite(str(folder / "gray.png"), cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY))
    (folder / "sub").mkdir()
    cv2.imwrite(str(folder / "sub" / "wide.jpg"), cv2.resize(colour, (300, 120)))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    cv2.imwrite(str(folder / "noise.png"), rng.integers(0, 255, (97, 131, 3), dtype=np.uint8))
    return folder


def categories(data_dir: Path) -> dict[int, str]:
    gt = json.loads((data_dir / "synthetic" / "annotations" / "train.json").read_text())
    return {c["id"]: c["name"] for c in gt["categories"]}


def test_predict_on_a_folder_skips_a_corrupt_file_and_writes_dataset_ids(finetuned, images, data_dir, tmp_path):
    proc = run_cli([*PREDICT, f"stage.init_from={finetuned}", f"stage.input={images}"], tmp_path, data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "broken.png" in proc.stdout + proc.stderr  # the warning
    predictions = json.loads((tmp_path / "predict" / "predictions.json").read_text())
    summary = json.loads((tmp_path / "predict" / "summary.json").read_text())
    assert summary["num_skipped"] == 1 and summary["skipped"][0]["file_name"] == "broken.png"
    assert {p["file_name"] for p in predictions} == {"gray.png", "noise.png", "sub/wide.jpg"}
    known = categories(data_dir)
    assert min(known) > 0 and sorted(known) != list(range(len(known)))  # the synthetic ids are sparse
    for p in predictions:
        assert known[p["category_id"]] == p["category_name"]
        x, y, w, h = p["bbox"]
        assert w >= 0 and h >= 0 and 0.0 <= p["score"] <= 1.0
    wide = [p["bbox"] for p in predictions if p["file_name"] == "sub/wide.jpg"]
    assert max(x + w for x, _, w, _ in wide) <= 300.5 and max(y + h for _, y, _, h in wide) <= 120.5
    assert sorted(p.name for p in (tmp_path / "predict" / "vis").iterdir()) == [
        "gray.png",
        "noise.png",
        "sub__wide.png",
    ]


def test_the_python_api_gives_the_same_boxes_as_the_stage(finetuned, images, data_dir, tmp_path):
    proc = run_cli(
        [*PREDICT, f"stage.init_from={finetuned}", f"stage.input={images / 'sub' / 'wide.jpg'}"], tmp_path, data_dir
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    staged = json.loads((tmp_path / "predict" / "predictions.json").read_text())
    detector = load_detector(finetuned / "finetune")
    detections = detector(images / "sub" / "wide.jpg")
    assert len(detections) == len(staged) > 0
    xywh = np.concatenate([detections.boxes[:, :2], detections.boxes[:, 2:] - detections.boxes[:, :2]], axis=1)
    np.testing.assert_allclose(xywh, [p["bbox"] for p in staged], atol=0.01)
    assert detections.category_ids == [p["category_id"] for p in staged]
    # An array works as well as a path, and a batch as well as one image.
    rgb = cv2.cvtColor(cv2.imread(str(images / "sub" / "wide.jpg")), cv2.COLOR_BGR2RGB)
    batch = detector([rgb, images / "gray.png"])
    np.testing.assert_allclose(batch[0].boxes, detections.boxes, atol=1e-4)


def test_bad_predict_input_is_one_line(finetuned, data_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli([*PREDICT, f"stage.init_from={finetuned}", f"stage.input={empty}"], tmp_path, data_dir)
    assert_one_line_error(proc, "stage.input", "empty", "holds no")
    proc = run_cli([*PREDICT, f"stage.init_from={finetuned}", f"stage.input={tmp_path / 'nope'}"], tmp_path, data_dir)
    assert_one_line_error(proc, "stage.input", "nope")


def test_a_checkpoint_without_class_names_is_refused(data_dir, tmp_path):
    proc = run_cli(["experiment=smoke", "stage=box_pretrain", "trainer.max_iters=1"], tmp_path, data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli(
        [*PREDICT, f"stage.init_from={tmp_path / 'box_pretrain'}", f"stage.input={tmp_path}"], tmp_path / "p", data_dir
    )
    assert_one_line_error(proc, "box_pretrain", "records no category names")
