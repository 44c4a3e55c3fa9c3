"""Detection transforms: each takes and returns `(image, target)` and moves the boxes with the image.

`image` is a float CHW tensor in [0, 1]; `target` holds `boxes` (float [N, 4] xyxy pixels) and `size`
(int64 [h, w]), which every geometric transform keeps current. Boxes are clipped to the image but never
dropped, so other per-box fields stay aligned (the two-view dataset relies on it). All randomness comes from torch's global
RNG, which the trainer seeds (and DataLoader workers derive from it), so runs are reproducible.
"""

from collections.abc import Callable, Sequence

import torch
from omegaconf import DictConfig
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from stages.errors import UserError

Target = dict
Transform = Callable[[Tensor, Target], tuple[Tensor, Target]]


def _clip_boxes(boxes: Tensor, height: int, width: int) -> Tensor:
    boxes = boxes.clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return boxes


class Compose:
    """Applies transforms in order."""

    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


class RandomResize:
    """Resizes so the shorter edge is a size drawn uniformly from `min_sizes` and the longer edge is at
    most `max_size` (the shorter edge gives way), keeping the aspect ratio. One entry in `min_sizes`
    makes it deterministic (evaluation)."""

    def __init__(self, min_sizes: Sequence[int], max_size: int):
        if len(min_sizes) == 0 or min(min_sizes) <= 0 or max_size <= 0:
            raise ValueError(f"RandomResize: min_sizes {list(min_sizes)} and max_size {max_size} must be > 0")
        self.min_sizes = [int(s) for s in min_sizes]
        self.max_size = int(max_size)

    def output_size(self, height: int, width: int, min_size: int) -> tuple[int, int]:
        """(h, w) after resizing an image of (height, width) so its shorter edge is `min_size`."""
        scale = min_size / min(height, width)
        if max(height, width) * scale > self.max_size:
            scale = self.max_size / max(height, width)
        return max(1, round(height * scale)), max(1, round(width * scale))

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        min_size = self.min_sizes[int(torch.randint(len(self.min_sizes), ()))]
        height, width = image.shape[-2:]
        new_h, new_w = self.output_size(height, width, min_size)
        image = F.resize(image, [new_h, new_w], antialias=True).clamp_(0, 1)
        target = dict(target)
        scale = torch.tensor([new_w / width, new_h / height, new_w / width, new_h / height])
        target["boxes"] = _clip_boxes(target["boxes"] * scale, new_h, new_w)
        target["size"] = torch.tensor([new_h, new_w], dtype=torch.int64)
        return image, target

    def __repr__(self) -> str:
        return f"RandomResize(min_sizes={self.min_sizes}, max_size={self.max_size})"


class RandomHorizontalFlip:
    """Mirrors image and boxes left-right with probability `p`."""

    def __init__(self, p: float):
        if not 0 <= p <= 1:
            raise ValueError(f"RandomHorizontalFlip: p {p} must be in [0, 1]")
        self.p = p

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        if float(torch.rand(())) >= self.p:
            return image, target
        width = image.shape[-1]
        image = image.flip(-1)
        target = dict(target)
        boxes = target["boxes"]
        target["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class PhotometricJitter:
    """Random brightness, contrast, saturation and hue changes (torchvision's ColorJitter, random order);
    the image only, boxes untouched. Zero for a factor leaves it alone."""

    def __init__(self, brightness: float, contrast: float, saturation: float, hue: float):
        self.jitter = v2.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        return self.jitter(image).clamp_(0, 1), target

    def __repr__(self) -> str:
        return f"PhotometricJitter({self.jitter})"


def _check_sizes(cfg: DictConfig, where: str) -> None:
    min_sizes = list(cfg.min_sizes)
    if not min_sizes or any(not isinstance(s, int) or s <= 0 for s in min_sizes):
        raise UserError(f"{where}.min_sizes: got {min_sizes}; expected a non-empty list of positive ints")
    if not isinstance(cfg.max_size, int) or cfg.max_size < max(min_sizes):
        raise UserError(f"{where}.max_size: got {cfg.max_size!r}; expected an int >= max(min_sizes)")


def build_transforms(transform_cfg: DictConfig, train: bool) -> Compose:
    """The training or evaluation pipeline from `data.transforms` (its `train` or `val` entry).

    Training: horizontal flip, random resize, photometric jitter (left out when all its factors are 0).
    Evaluation: a deterministic resize (`val.min_sizes` should hold one size).
    """
    where = f"data.transforms.{'train' if train else 'val'}"
    cfg = transform_cfg.train if train else transform_cfg.val
    _check_sizes(cfg, where)
    resize = RandomResize(list(cfg.min_sizes), cfg.max_size)
    if not train:
        return Compose([resize])
    if not 0 <= cfg.flip_prob <= 1:
        raise UserError(f"{where}.flip_prob: got {cfg.flip_prob}; expected a probability in [0, 1]")
    transforms: list[Transform] = [RandomHorizontalFlip(cfg.flip_prob), resize]
    factors = (cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)
    if any(factors):
        if min(factors) < 0 or cfg.hue > 0.5:
            raise UserError(f"{where}: jitter factors {factors} must be >= 0 and hue <= 0.5")
        transforms.append(PhotometricJitter(*factors))
    return Compose(transforms)
