"""Supervised backbone pre-training: classify the ground-truth object crops of a detection dataset.

`GroundTruthCrops` turns a detection dataset into a classification one (one item per ground-truth box, cut out
with some context and resized to a square); `CropClassifier` is backbone -> global average pool -> linear.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from models.ssl import encoder_out_dim, image_to_chw, pooled_features


class CropClassifier(nn.Module):
    """forward(crops float [B, 3, S, S] in [0, 1], labels int64 [B] | None).

    With labels: {"cls/loss": cross-entropy, "cls/accuracy": top-1 accuracy (a statistic, not a loss term)}.
    Without labels: the logits [B, num_classes]. `encoder` is kept as `encoder` (the same object) so the caller
    can save its weights."""

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        feature_dim: int | None = None,
    ):
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder_out_dim(encoder, feature_dim), num_classes)
        self.register_buffer("pixel_mean", torch.tensor(list(pixel_mean)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(list(pixel_std)).view(1, 3, 1, 1), persistent=False)

    def forward(self, crops: Tensor, labels: Tensor | None = None) -> dict[str, Tensor] | Tensor:
        logits = self.classifier(pooled_features(self.encoder, (crops - self.pixel_mean) / self.pixel_std))
        if labels is None:
            return logits
        accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
        return {"cls/loss": F.cross_entropy(logits, labels), "cls/accuracy": accuracy}


def context_box(box: Sequence[float], context: float, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, h, w) in whole pixels: `box` (xyxy) grown by `context` x its size on every side, clipped to the
    image, at least one pixel."""
    x0, y0, x1, y1 = (float(v) for v in box)
    dx, dy = context * (x1 - x0), context * (y1 - y0)
    left = math.floor(max(0.0, x0 - dx))
    top = math.floor(max(0.0, y0 - dy))
    right = math.ceil(min(float(width), x1 + dx))
    bottom = math.ceil(min(float(height), y1 + dy))
    return top, left, max(1, bottom - top), max(1, right - left)


class GroundTruthCrops(Dataset):
    """One item per ground-truth box of `source`: (crop float [3, crop_size, crop_size] in [0, 1], label int64).

    `source` is a detection dataset (docs/interfaces.md): `load_image(i) -> HxWx3 uint8`, `raw_target(i)` with
    `boxes` (xyxy pixels of the file) and `labels`, and `num_classes`. Boxes whose shorter side is below
    `min_box_size` pixels are skipped. The crop keeps `context` x the box size around the box and is resized to a
    square (aspect ratio not kept, as a classifier's input); it is flipped horizontally with `flip_prob`."""

    def __init__(self, source, crop_size: int, context: float, min_box_size: float, flip_prob: float):
        self.source = source
        self.crop_size = int(crop_size)
        self.context = float(context)
        self.flip_prob = float(flip_prob)
        self.num_classes = int(source.num_classes)
        # (image index, box xyxy, label) for every kept box; built once from the annotations, no pixels read.
        self.items: list[tuple[int, list[float], int]] = []
        for index in range(len(source)):
            target = source.raw_target(index)
            boxes = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4)
            labels = torch.as_tensor(target["labels"], dtype=torch.int64).reshape(-1)
            for box, label in zip(boxes.tolist(), labels.tolist(), strict=True):
                if min(box[2] - box[0], box[3] - box[1]) >= min_box_size:
                    self.items.append((index, box, label))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> tuple[Tensor, Tensor]:
        index, box, label = self.items[k]
        image = image_to_chw(self.source.load_image(index))
        top, left, h, w = context_box(box, self.context, image.shape[-2], image.shape[-1])
        crop = TF.resized_crop(image, top, left, h, w, [self.crop_size, self.crop_size], antialias=True)
        if self.flip_prob > 0 and torch.rand(()) < self.flip_prob:
            crop = TF.horizontal_flip(crop)
        return TF.to_dtype(crop, torch.float32, scale=True), torch.tensor(label, dtype=torch.int64)
