"""The two-crop augmentation of image-level self-supervised learning and the datasets that turn plain images, or
their selective-search proposal crops, into (view1, view2) pairs.

Used by image_pretrain's self-supervised method (`models.pretrain.ssl`); the box-domain two-view mapping of AlignDet
is a different thing and lives in `stages/data/two_view.py`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

from stages.data.crops import context_box, image_to_chw


class TwoCropTransform:
    """BYOL's asymmetric augmentation: one image -> two float [3, crop_size, crop_size] views in [0, 1].

    Each view: RandomResizedCrop(scale, ratio) -> horizontal flip -> colour jitter (with `jitter_prob`) ->
    grayscale -> Gaussian blur (probability per view from `blur_probs`, kernel `blur_kernel_fraction` of the crop)
    -> solarize (probability per view from `solarize_probs`). BYOL's published values: blur (1.0, 0.1),
    solarize (0.0, 0.2), jitter 0.8 with (0.4, 0.4, 0.2, 0.1), grayscale 0.2."""

    def __init__(
        self,
        crop_size: int,
        scale: Sequence[float],
        ratio: Sequence[float],
        flip_prob: float,
        jitter_prob: float,
        brightness: float,
        contrast: float,
        saturation: float,
        hue: float,
        grayscale_prob: float,
        blur_probs: Sequence[float],
        blur_sigma: Sequence[float],
        blur_kernel_fraction: float,
        solarize_probs: Sequence[float],
        solarize_threshold: float,
    ):
        if len(blur_probs) != 2 or len(solarize_probs) != 2:
            raise ValueError(f"blur_probs {blur_probs} and solarize_probs {solarize_probs}: expected one per view")
        kernel = max(3, int(round(blur_kernel_fraction * crop_size)) // 2 * 2 + 1)  # odd, as blur requires
        self.views = [
            v2.Compose(
                [
                    v2.RandomResizedCrop(crop_size, scale=tuple(scale), ratio=tuple(ratio), antialias=True),
                    v2.RandomHorizontalFlip(flip_prob),
                    v2.ToDtype(torch.float32, scale=True),
                    v2.RandomApply([v2.ColorJitter(brightness, contrast, saturation, hue)], p=jitter_prob),
                    v2.RandomGrayscale(grayscale_prob),
                    v2.RandomApply([v2.GaussianBlur(kernel, sigma=tuple(blur_sigma))], p=blur_p),
                    v2.RandomSolarize(solarize_threshold, p=solarize_p),
                ]
            )
            for blur_p, solarize_p in zip(blur_probs, solarize_probs, strict=True)
        ]

    def __call__(self, image: np.ndarray | Tensor) -> tuple[Tensor, Tensor]:
        image = image_to_chw(image)
        return self.views[0](image), self.views[1](image)


class TwoViewDataset(Dataset):
    """The images of `source` (anything with `__len__` and `load_image(index) -> HxWx3 uint8`, e.g. a detection
    dataset; labels are never read) as (view1, view2) pairs; the default collate stacks them into batches."""

    def __init__(self, source, transform: TwoCropTransform):
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.transform(self.source.load_image(index))


class ProposalCropViews(Dataset):
    """One item per unsupervised box proposal of `source`: the proposal's crop (with `context` x its size kept on
    every side) as a (view1, view2) pair of `transform`. Labels are never read.

    Whole-image views of the small synthetic images share too little for instance discrimination to learn
    (MoCo v3's loss stays at chance, docs/results.md); a proposal crop is one object-like region, so both
    views see the same thing, as in object-centric pre-training (SoCo, DetCon).

    `proposals` maps image id -> boxes (xyxy pixels of the file), as `stages.data.proposals` returns them;
    images without proposals give no items."""

    def __init__(self, source, proposals: Mapping, context: float, transform: TwoCropTransform):
        if context < 0:
            raise ValueError(f"context: expected >= 0, got {context}")
        self.source = source
        self.context = float(context)
        self.transform = transform
        self.items = [
            (index, tuple(float(v) for v in box))
            for index, image_id in enumerate(source.image_ids)
            for box in np.asarray(proposals.get(image_id, []), dtype=np.float64).reshape(-1, 4)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image_index, box = self.items[index]
        image = image_to_chw(self.source.load_image(image_index))
        top, left, height, width = context_box(box, self.context, image.shape[-2], image.shape[-1])
        return self.transform(image[:, top : top + height, left : left + width])
