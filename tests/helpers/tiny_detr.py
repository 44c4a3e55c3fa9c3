"""A tiny Deformable-DETR for model tests, built from the same config the pipeline uses (experiment=smoke)."""

from __future__ import annotations

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from tests.helpers import CONF_DIR


def tiny_detr(num_classes: int = 3, overrides: tuple[str, ...] = (), seed: int = 0) -> torch.nn.Module:
    """`model.detector` of experiment=smoke (d_model 32, 1+2 layers, 10 queries) plus `overrides`."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=["experiment=smoke", *overrides])
    torch.manual_seed(seed)
    return instantiate(cfg.model.detector, num_classes=num_classes)


def two_tiny_images(size: int = 64) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Two images with bright rectangles on noise and their xyxy pixel targets (three boxes in all)."""
    g = torch.Generator().manual_seed(0)
    boxes = [torch.tensor([[8.0, 10.0, 40.0, 50.0]]), torch.tensor([[4.0, 6.0, 28.0, 26.0], [34.0, 30.0, 60.0, 58.0]])]
    labels = [torch.tensor([0]), torch.tensor([1, 2])]
    colours = torch.tensor([[1.0, 0.2, 0.2], [0.2, 1.0, 0.2], [0.2, 0.2, 1.0]])
    images = []
    for b, lab in zip(boxes, labels):
        img = 0.3 * torch.rand(3, size, size, generator=g)
        for (x1, y1, x2, y2), c in zip(b.long().tolist(), lab.tolist()):
            img[:, y1:y2, x1:x2] = colours[c][:, None, None]
        images.append(img)
    return images, [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels)]
