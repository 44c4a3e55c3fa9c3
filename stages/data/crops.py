"""Classification inputs for image_pretrain's supervised method: float [3, S, S] images in [0, 1] with int64 labels.

`GroundTruthCrops` turns a detection dataset into a classification one (one item per ground-truth box, cut out
with some context and resized to a square); `ImageFolderCrops` reads a local folder in torchvision's ImageFolder
layout (root/<class>/<image>). Both expose `num_classes` and return the same items, so `CropClassifier` trains on
either.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.v2 import functional as TF

from stages.errors import UserError

# What PIL raises for a file it cannot identify or decode (truncated data, bad header, oversized image).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def image_to_chw(image: np.ndarray | Tensor) -> Tensor:
    """HxWx3 uint8 numpy (a dataset's `load_image`) or a CHW tensor -> CHW tensor."""
    if isinstance(image, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    return image


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


def flip_and_scale(crop: Tensor, flip_prob: float) -> Tensor:
    """uint8 CHW crop -> float in [0, 1], flipped horizontally with `flip_prob` (torch's global RNG)."""
    if flip_prob > 0 and torch.rand(()) < flip_prob:
        crop = TF.horizontal_flip(crop)
    return TF.to_dtype(crop, torch.float32, scale=True)


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
        return flip_and_scale(crop, self.flip_prob), torch.tensor(label, dtype=torch.int64)


def decode_error(path: str | Path, err: Exception) -> UserError:
    """The one-line UserError for an image file PIL could not read."""
    reason = " ".join(f"{type(err).__name__}: {err}".split())  # one line, whatever PIL put in the message
    return UserError(f"{path}: cannot be decoded as an image ({reason}); expected an image file")


def read_rgb(path: str | Path) -> Tensor:
    """uint8 [3, H, W] of the image file at `path`; UserError naming the file when PIL cannot decode it."""
    try:
        with Image.open(path) as image:
            return TF.pil_to_tensor(image.convert("RGB"))
    except DECODE_ERRORS as err:
        raise decode_error(path, err) from None


class ImageFolderCrops(Dataset):
    """The images of a local ImageFolder (`root/<class>/<image>`, classes = sorted sub-folder names, label = index)
    as (image float [3, crop_size, crop_size] in [0, 1], label int64), the items of `GroundTruthCrops`.

    Files and classes are listed by `torchvision.datasets.ImageFolder` (its image extensions). Each image is read
    as RGB, resized to a square (aspect ratio not kept) and flipped horizontally with `flip_prob`. Every file's
    header is opened once here, so a file that is not an image stops the run before training rather than inside
    a loader worker; a file whose pixel data is broken is reported when it is read. All such problems, and a
    missing folder, no class sub-folders or a class without images, raise `UserError` naming the path."""

    def __init__(self, root: str | Path, crop_size: int, flip_prob: float):
        self.root = Path(root).expanduser()
        self.crop_size = int(crop_size)
        self.flip_prob = float(flip_prob)
        expected = f"expected an ImageFolder: root/<class>/<image> with extensions {', '.join(IMG_EXTENSIONS)}"
        if not self.root.is_dir():
            raise UserError(f"{self.root}: folder does not exist; {expected}")
        try:
            # allow_empty: an empty class is reported below in this pipeline's one-line form.
            folder = ImageFolder(str(self.root), allow_empty=True)
        except FileNotFoundError:
            raise UserError(f"{self.root}: no class sub-folders; {expected}") from None
        self.class_names: list[str] = list(folder.classes)
        self.samples: list[tuple[str, int]] = list(folder.samples)
        self.num_classes = len(self.class_names)
        if not self.samples:
            raise UserError(f"{self.root}: no images in its class sub-folders; {expected}")
        empty = sorted(set(self.class_names) - {self.class_names[label] for _, label in self.samples})
        if empty:
            raise UserError(f"{self.root}: class folder(s) {', '.join(empty)} hold no images; {expected}")
        for path, _ in self.samples:
            try:
                Image.open(path).close()  # reads the header only
            except DECODE_ERRORS as err:
                raise decode_error(path, err) from None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, k: int) -> tuple[Tensor, Tensor]:
        path, label = self.samples[k]
        image = TF.resize(read_rgb(path), [self.crop_size, self.crop_size], antialias=True)
        return flip_and_scale(image, self.flip_prob), torch.tensor(label, dtype=torch.int64)
