import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

import stages.data.synthetic as synthetic
from stages.data.coco import CocoDetection
from stages.data.synthetic import ensure_synthetic
from stages.errors import UserError
from tests.helpers import CONF_DIR

CONF = CONF_DIR / "data" / "synthetic.yaml"


def tiny_cfg(root: Path, **generator):
    """The shipped synthetic data config, shrunk to a few small images under `root`."""
    cfg = OmegaConf.load(CONF)
    cfg.root = str(root)
    cfg.generator.update(num_train=4, num_val=2, image_size=[48, 64], **generator)
    return cfg


def files(cfg):
    root = Path(cfg.root)
    return root / cfg.train_json, root / cfg.train_images / "000001.png"


def test_generation_is_deterministic_to_the_byte(tmp_path):
    first, second = tiny_cfg(tmp_path / "a"), tiny_cfg(tmp_path / "b")
    ensure_synthetic(first)
    ensure_synthetic(second)
    for path_a, path_b in zip(files(first), files(second), strict=True):
        assert path_a.read_bytes() == path_b.read_bytes()


def test_changed_parameter_regenerates_and_same_parameters_do_not(tmp_path):
    cfg = tiny_cfg(tmp_path / "data")
    ensure_synthetic(cfg)
    train_json, first_image = files(cfg)
    before = train_json.read_bytes(), first_image.read_bytes(), train_json.stat().st_mtime_ns
    ensure_synthetic(cfg)
    assert train_json.stat().st_mtime_ns == before[2]  # left alone
    ensure_synthetic(tiny_cfg(tmp_path / "data", seed=1))
    assert train_json.read_bytes() != before[0] and first_image.read_bytes() != before[1]
    record = json.loads((Path(cfg.root) / "generator.json").read_text())
    assert record["generator"]["seed"] == 1
    assert not list(tmp_path.glob(".data.partial-*")) and not list(tmp_path.glob(".data.stale-*"))


def test_generated_dataset_reads_with_the_coco_loader_and_sparse_ids(tmp_path):
    cfg = tiny_cfg(tmp_path / "data")
    ensure_synthetic(cfg)
    root = Path(cfg.root)
    dataset = CocoDetection(root / cfg.val_images, root / cfg.val_json)
    classes = list(cfg.generator.classes)
    assert dataset.class_names == classes
    assert dataset.label_to_cat_id == [2 * i + 1 for i in range(len(classes))]
    assert len(dataset) == 2
    low, high = cfg.generator.objects_per_image
    for index in range(len(dataset)):
        image, target = dataset[index]
        height, width = image.shape[-2:]
        assert 48 <= height <= 64 and 48 <= width <= 64
        assert 1 <= len(target["boxes"]) <= high
        boxes = target["boxes"]
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        assert (boxes[:, 0::2] <= width).all() and (boxes[:, 1::2] <= height).all()
    summary = synthetic.generation_summary(root)["val"]
    assert summary["images"] == 2 and summary["objects"] == len(dataset.coco.getAnnIds())
    assert sum(summary["per_class"].values()) == sum(summary["per_size"].values()) == summary["objects"]


def generator_params(**changes) -> dict:
    params = json.loads(json.dumps(OmegaConf.to_container(OmegaConf.load(CONF).generator)))
    params.update(changes)
    return params


def test_object_boxes_are_tight_around_the_drawn_shape():
    # One shape on a flat, noise-free background: the pixels at least half-way to its colour span its box.
    params = generator_params(objects_per_image=[1, 1], background_grids=[1], stripe_prob=0.0, noise_std=0.0)
    for seed in range(20):
        image, objects = synthetic._draw_image(64, 80, params, np.random.default_rng(seed))
        x, y, w, h = objects[0]["bbox"]
        corner = next(
            (r, c) for r, c in [(0, 0), (0, 79), (63, 0), (63, 79)] if not (x <= c < x + w and y <= r < y + h)
        )
        difference = np.abs(image.astype(int) - image[corner].astype(int)).sum(-1)
        ys, xs = np.nonzero(difference > difference.max() / 2)
        pixels = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert np.abs(np.array(pixels) - [x, y, x + w, y + h]).max() <= 1, (seed, pixels, (x, y, w, h))


def test_occlusion_never_hides_more_than_max_occlusion():
    params = generator_params(objects_per_image=[6, 6], object_scale=[0.3, 0.6], max_occlusion=0.3)
    visible = []
    for seed in range(10):
        _, objects = synthetic._draw_image(64, 64, params, np.random.default_rng(seed))
        visible += [obj["visible"] for obj in objects]
    assert min(visible) >= 0.7 and min(visible) < 0.95  # limit holds, and occlusion does happen
    params.update(max_occlusion=0.0)
    for seed in range(3):
        _, objects = synthetic._draw_image(64, 64, params, np.random.default_rng(seed))
        assert all(obj["visible"] == 1.0 for obj in objects)


def test_killed_generation_leaves_no_half_dataset(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path / "data")
    real_write_split = synthetic._write_split

    def dies_on_val(folder, split, *args):
        if split == "val":
            raise KeyboardInterrupt
        return real_write_split(folder, split, *args)

    monkeypatch.setattr(synthetic, "_write_split", dies_on_val)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic(cfg)
    assert not (tmp_path / "data").exists()
    monkeypatch.setattr(synthetic, "_write_split", real_write_split)
    ensure_synthetic(cfg)
    assert all(path.is_file() for path in files(cfg))
    assert not list(tmp_path.glob(".data.partial-*"))


def test_refuses_to_replace_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep me")
    with pytest.raises(UserError, match=r"^data\.root: .*mine is not empty and holds no generator\.json"):
        ensure_synthetic(tiny_cfg(tmp_path / "mine"))
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "keep me"


def test_unknown_shape_is_a_user_error_naming_the_key(tmp_path):
    with pytest.raises(UserError, match=r"^data\.generator\.classes: got .*hexagon.*; expected distinct names"):
        ensure_synthetic(tiny_cfg(tmp_path / "data", classes=["circle", "hexagon"]))
