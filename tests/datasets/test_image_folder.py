"""Supervised image pre-training on a local ImageFolder: items and labels, one-line errors for bad folders, and
`python run.py stage=image_pretrain stage.method=supervised stage.supervised.image_folder=DIR` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from stages.data.crops import ImageFolderCrops
from stages.errors import UserError
from tests.helpers import CONF_DIR, run_cli

# ImageFolder labels classes by sorted folder name: blue 0, green 1, red 2.
COLOURS = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}


def _write_png(path: Path, colour, height: int = 32, width: int = 32, left_half_only: bool = False) -> None:
    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width // 2 if left_half_only else width] = colour
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def _image_folder(root: Path, per_class: int = 3) -> Path:
    """root/<colour>/<k>.png: plain images of the class colour; the red ones are 24x40, not square."""
    for name, colour in COLOURS.items():
        for k in range(per_class):
            size = (24, 40) if name == "red" else (32, 32)
            _write_png(root / name / f"{k}.png", colour, *size)
    return root


def test_image_folder_items_are_resized_rgb_squares_labelled_by_sorted_folder(tmp_path):
    crops = ImageFolderCrops(_image_folder(tmp_path / "folder"), crop_size=16, flip_prob=0.0)
    assert crops.num_classes == 3 and crops.class_names == ["blue", "green", "red"]
    assert len(crops) == 9
    seen = set()
    for k in range(len(crops)):
        image, label = crops[k]
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32
        assert label.dtype == torch.int64 and label.shape == ()
        expected = torch.tensor(COLOURS[crops.class_names[int(label)]], dtype=torch.float32) / 255
        torch.testing.assert_close(image.mean(dim=(1, 2)), expected, atol=0.01, rtol=0)
        seen.add(int(label))
    assert seen == {0, 1, 2}


def test_image_folder_flips_with_flip_prob(tmp_path):
    _write_png(tmp_path / "folder" / "a" / "0.png", (255, 255, 255), left_half_only=True)
    kept = ImageFolderCrops(tmp_path / "folder", crop_size=16, flip_prob=0.0)[0][0]
    flipped = ImageFolderCrops(tmp_path / "folder", crop_size=16, flip_prob=1.0)[0][0]
    assert kept[:, :, :8].mean() > 0.9 and kept[:, :, 8:].mean() < 0.1
    torch.testing.assert_close(flipped, kept.flip(-1))


def test_grayscale_images_are_read_as_rgb(tmp_path):
    path = tmp_path / "folder" / "gray" / "0.png"
    path.parent.mkdir(parents=True)
    Image.fromarray(np.full((20, 20), 200, np.uint8), mode="L").save(path)
    image, _ = ImageFolderCrops(tmp_path / "folder", crop_size=8, flip_prob=0.0)[0]
    assert image.shape == (3, 8, 8)
    torch.testing.assert_close(image, torch.full((3, 8, 8), 200 / 255))


def test_missing_folder_is_a_user_error_naming_it(tmp_path):
    with pytest.raises(UserError, match="does not exist") as err:
        ImageFolderCrops(tmp_path / "nowhere", crop_size=16, flip_prob=0.0)
    assert str(tmp_path / "nowhere") in str(err.value) and "\n" not in str(err.value)


def test_folder_without_class_sub_folders_is_a_user_error_naming_it(tmp_path):
    _write_png(tmp_path / "flat" / "0.png", (255, 0, 0))  # images straight under root: no classes
    with pytest.raises(UserError, match="no class sub-folders") as err:
        ImageFolderCrops(tmp_path / "flat", crop_size=16, flip_prob=0.0)
    assert str(tmp_path / "flat") in str(err.value)


def test_class_folders_without_images_are_a_user_error_naming_the_folder(tmp_path):
    (tmp_path / "folder" / "a").mkdir(parents=True)
    (tmp_path / "folder" / "a" / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match="no images") as err:
        ImageFolderCrops(tmp_path / "folder", crop_size=16, flip_prob=0.0)
    assert str(tmp_path / "folder") in str(err.value)


def test_one_empty_class_is_a_user_error_naming_the_class(tmp_path):
    root = _image_folder(tmp_path / "folder", per_class=1)
    (root / "yellow").mkdir()
    with pytest.raises(UserError, match="yellow hold no images") as err:
        ImageFolderCrops(root, crop_size=16, flip_prob=0.0)
    assert str(root) in str(err.value)


def test_a_file_that_is_not_an_image_is_a_user_error_naming_it_before_any_item_is_read(tmp_path):
    root = _image_folder(tmp_path / "folder", per_class=1)
    (root / "red" / "bad.png").write_bytes(b"this is not a png")
    with pytest.raises(UserError, match="cannot be decoded") as err:
        ImageFolderCrops(root, crop_size=16, flip_prob=0.0)
    assert str(root / "red" / "bad.png") in str(err.value) and "\n" not in str(err.value)


def test_a_truncated_image_is_a_user_error_naming_it_when_read(tmp_path):
    root = _image_folder(tmp_path / "folder", per_class=1)
    bad = root / "red" / "truncated.png"
    bad.write_bytes((root / "red" / "0.png").read_bytes()[:60])  # header intact, pixel data cut
    crops = ImageFolderCrops(root, crop_size=16, flip_prob=0.0)
    index = [path for path, _ in crops.samples].index(str(bad))
    with pytest.raises(UserError, match="cannot be decoded") as err:
        crops[index]
    assert str(bad) in str(err.value)


def test_image_pretrain_config_builds_image_folder_crops(tmp_path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=["stage=image_pretrain", "stage.method=supervised"])
    assert cfg.stage.supervised.image_folder is None
    crops = instantiate(cfg.stage.supervised.folder_crops, root=_image_folder(tmp_path / "folder", per_class=1))
    assert crops[0][0].shape[-1] == cfg.stage.supervised.crops.crop_size and crops.num_classes == 3


def test_supervised_image_pretrain_on_an_image_folder_end_to_end(tmp_path, data_dir):
    root = _image_folder(tmp_path / "folder")
    args = ["experiment=smoke", "stage=image_pretrain", "stage.method=supervised"]
    proc = run_cli([*args, f"stage.supervised.image_folder={root}"], tmp_path / "run", data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "run" / "image_pretrain" / "checkpoint.pth", weights_only=True)
    assert ckpt["model"] and all(k.startswith("backbone.body.") for k in ckpt["model"])
    summary = json.loads((tmp_path / "run" / "image_pretrain" / "summary.json").read_text())
    assert summary["input"] == f"image_folder: {root}"
    assert summary["num_classes"] == 3 and summary["num_items"] == 9 and summary["iterations"] == 6


def test_image_pretrain_on_a_missing_folder_fails_with_one_line(tmp_path, data_dir):
    args = ["experiment=smoke", "stage=image_pretrain", "stage.method=supervised"]
    proc = run_cli([*args, f"stage.supervised.image_folder={tmp_path / 'nowhere'}"], tmp_path / "run", data_dir)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(tmp_path / "nowhere") in errors[0]
