import pytest
import torch
from omegaconf import OmegaConf

from stages.data.transforms import (
    Compose,
    PhotometricJitter,
    RandomHorizontalFlip,
    RandomResize,
    build_transforms,
)
from stages.errors import UserError


def white_rectangle(height=60, width=90, box=(20, 10, 50, 40)):
    """A black image with a white rectangle at `box` (x1, y1, x2, y2) and its target."""
    image = torch.zeros(3, height, width)
    x1, y1, x2, y2 = box
    image[:, y1:y2, x1:x2] = 1.0
    target = {
        "boxes": torch.tensor([box], dtype=torch.float32),
        "labels": torch.tensor([0]),
        "image_id": 1,
        "orig_size": torch.tensor([height, width]),
        "size": torch.tensor([height, width]),
    }
    return image, target


def white_pixel_box(image: torch.Tensor) -> torch.Tensor:
    ys, xs = torch.nonzero(image.mean(0) > 0.5, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def test_horizontal_flip_keeps_the_box_on_the_white_rectangle():
    image, target = white_rectangle()
    flipped, flipped_target = RandomHorizontalFlip(p=1.0)(image, target)
    assert torch.equal(flipped_target["boxes"][0], torch.tensor([40.0, 10.0, 70.0, 40.0]))
    assert torch.allclose(flipped_target["boxes"][0], white_pixel_box(flipped), atol=1)


def test_horizontal_flip_with_zero_probability_changes_nothing():
    image, target = white_rectangle()
    out, out_target = RandomHorizontalFlip(p=0.0)(image, target)
    assert torch.equal(out, image) and torch.equal(out_target["boxes"], target["boxes"])


@pytest.mark.parametrize("min_size,max_size", [(120, 1000), (30, 1000), (100, 110)])
def test_resize_keeps_the_box_on_the_white_rectangle_and_updates_size(min_size, max_size):
    image, target = white_rectangle()
    resized, resized_target = RandomResize([min_size], max_size)(image, target)
    height, width = resized.shape[-2:]
    assert resized_target["size"].tolist() == [height, width]
    assert max(height, width) <= max_size
    assert min(height, width) == min_size or max(height, width) == max_size
    assert torch.allclose(resized_target["boxes"][0], white_pixel_box(resized), atol=2)


def test_resize_draws_the_short_side_from_min_sizes():
    torch.manual_seed(0)
    image, target = white_rectangle()
    shorts = {min(RandomResize([40, 50, 70], 1000)(image, target)[0].shape[-2:]) for _ in range(30)}
    assert shorts == {40, 50, 70}


def test_transforms_clip_boxes_to_the_image():
    image, target = white_rectangle()
    target["boxes"] = torch.tensor([[-10.0, -5.0, 100.0, 70.0]])
    _, out = RandomResize([30], 1000)(image, target)
    assert out["boxes"].tolist() == [[0.0, 0.0, 45.0, 30.0]]


def test_photometric_jitter_changes_colours_only():
    torch.manual_seed(0)
    image, target = white_rectangle()
    image = image * 0.5 + 0.25
    out, out_target = PhotometricJitter(0.4, 0.4, 0.4, 0.1)(image, target)
    assert out.shape == image.shape and not torch.equal(out, image)
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out_target["boxes"], target["boxes"])


def transform_cfg():
    return OmegaConf.create(
        {
            "train": {
                "min_sizes": [40, 48, 56],
                "max_size": 100,
                "flip_prob": 0.5,
                "brightness": 0.2,
                "contrast": 0.2,
                "saturation": 0.2,
                "hue": 0.02,
            },
            "val": {"min_sizes": [48], "max_size": 100},
        }
    )


def test_train_pipeline_is_reproducible_from_torch_seed_and_keeps_boxes_on_objects():
    train = build_transforms(transform_cfg(), train=True)
    assert isinstance(train, Compose) and len(train.transforms) == 3
    outputs = []
    for _ in range(2):
        torch.manual_seed(123)
        outputs.append([train(*white_rectangle()) for _ in range(5)])
    for (image_a, target_a), (image_b, target_b) in zip(*outputs, strict=True):
        assert torch.equal(image_a, image_b) and torch.equal(target_a["boxes"], target_b["boxes"])
    for image, target in outputs[0]:
        # Jitter moves colours, so find the rectangle by contrast with the (jittered) black background.
        bright = image.mean(0) > (image.mean(0).max() + image.mean(0).min()) / 2
        ys, xs = torch.nonzero(bright, as_tuple=True)
        pixels = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        assert torch.allclose(target["boxes"][0], pixels, atol=2)


def test_val_pipeline_is_a_deterministic_resize():
    val = build_transforms(transform_cfg(), train=False)
    image, target = white_rectangle()
    out, out_target = val(image, target)
    assert out.shape[-2:] == (48, 72) and out_target["size"].tolist() == [48, 72]


def test_all_zero_jitter_factors_leave_jitter_out():
    cfg = transform_cfg()
    cfg.train.update(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    assert not any(isinstance(t, PhotometricJitter) for t in build_transforms(cfg, train=True).transforms)


def test_bad_transform_config_is_a_user_error_naming_the_key():
    cfg = transform_cfg()
    cfg.train.max_size = 10
    with pytest.raises(UserError, match=r"^data\.transforms\.train\.max_size"):
        build_transforms(cfg, train=True)
    cfg = transform_cfg()
    cfg.val.min_sizes = []
    with pytest.raises(UserError, match=r"^data\.transforms\.val\.min_sizes"):
        build_transforms(cfg, train=False)
