"""Two augmented views of one image for box-domain pre-training, with the image's proposals carried
through each view's own transforms and tagged with ids that name the same region in both views.

Correspondence is by id, never by a box transform between views: proposal k of an image has id k in
every view in which it survives. Boxes move with each view's transforms (resize, then flip with the
unpadded width, then photometric jitter), so padding in the model cannot shift flipped boxes (the
reference pads before flipping).
"""

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from stages.data.transforms import Compose, PhotometricJitter, RandomHorizontalFlip, RandomResize
from stages.errors import UserError

log = logging.getLogger(__name__)

Target = dict
ViewTransform = Callable[[Tensor, Target], tuple[Tensor, Target]]


def clip_boxes(boxes: Tensor, height: int, width: int) -> Tensor:
    """xyxy boxes clipped to a (height, width) image."""
    limits = torch.tensor([width, height, width, height], dtype=boxes.dtype)
    return torch.minimum(boxes.clamp(min=0), limits)


class RandomCropKeepVisible:
    """A random crop whose height and width are each a fraction of the image's, drawn uniformly from
    [min_scale, max_scale], at a uniform position. A proposal stays when at least `min_visible` of its area
    is inside the crop; its box is clipped and shifted, its id kept. Randomness: torch's global RNG.
    """

    def __init__(self, min_scale: float, max_scale: float, min_visible: float):
        if not 0 < min_scale <= max_scale <= 1:
            raise UserError(
                f"stage.views.crop: min_scale {min_scale}, max_scale {max_scale}; "
                "expected 0 < min_scale <= max_scale <= 1"
            )
        if not 0 < min_visible <= 1:
            raise UserError(f"stage.views.crop.min_visible: got {min_visible}; expected a fraction in (0, 1]")
        self.min_scale = min_scale
        self.max_scale = max_scale
        self.min_visible = min_visible

    def sample_window(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of a random crop window in integer pixels."""
        scales = self.min_scale + (self.max_scale - self.min_scale) * torch.rand(2)
        crop_h = max(1, round(height * float(scales[0])))
        crop_w = max(1, round(width * float(scales[1])))
        y0 = int(torch.randint(height - crop_h + 1, ()))
        x0 = int(torch.randint(width - crop_w + 1, ()))
        return x0, y0, x0 + crop_w, y0 + crop_h

    def apply(self, image: Tensor, target: Target, window: tuple[int, int, int, int]) -> tuple[Tensor, Target]:
        """Crops `image` (CHW) and `target` (`boxes`, `ids`, optional `labels`) to `window`."""
        x0, y0, x1, y1 = window
        boxes = target["boxes"]
        shift = torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype)
        clipped = clip_boxes(boxes - shift, y1 - y0, x1 - x0)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        visible = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
        keep = visible >= self.min_visible * area
        target = dict(target)
        target["boxes"] = clipped[keep]
        target["ids"] = target["ids"][keep]
        if "labels" in target:
            target["labels"] = target["labels"][keep]
        target["size"] = torch.tensor([y1 - y0, x1 - x0], dtype=torch.int64)
        return image[:, y0:y1, x0:x1], target


class TwoViewDataset(Dataset):
    """Items `(image1, target1, image2, target2)` from the images of `dataset` that have proposals.

    `dataset` provides `load_image(index) -> HxWx3 uint8 RGB` and `image_ids`; `proposals` maps image id
    to float [N, 4] xyxy boxes in file pixels (images absent or with N = 0 are skipped). Each view runs its
    own transforms (`(image CHW float [0, 1], target) -> (image, target)`, moving `boxes`) on the same
    image. `crop_cfg` (`enabled`, `min_scale`, `max_scale`, `min_visible`, `max_tries`; None or
    enabled false: no crop) first crops each view on its own with `RandomCropKeepVisible`.

    Each target: `boxes` float32 [M, 4] xyxy in that view's pixels, clipped to it; `ids` int64 [M], the
    proposal's index 0..N-1 in the image (same region, same id, in both views; without a crop both views
    hold all N in order); `labels` int64 [M]: the proposals' pseudo-classes when `labels` maps image id to
    int [N] (aligned with the boxes), else zeros (one class, "proposal", for detector code that expects labels);
    `image_id`; `orig_size` and `size` int64 (h, w) of the file and of the view.
    With a crop, each view keeps at least one proposal and view 2 shares at least one id with view 1:
    a crop is redrawn up to `max_tries` times, then that view falls back to the whole image.
    """

    def __init__(
        self,
        dataset: Any,
        proposals: Mapping[Any, np.ndarray],
        view_transforms_1: ViewTransform,
        view_transforms_2: ViewTransform,
        crop_cfg: Mapping[str, Any] | None = None,
        labels: Mapping[Any, np.ndarray] | None = None,
    ):
        self.dataset = dataset
        self.proposals = proposals
        self.labels = labels
        self.view_transforms = (view_transforms_1, view_transforms_2)
        self.crop: RandomCropKeepVisible | None = None
        self.crop_max_tries = 0
        if crop_cfg is not None and crop_cfg["enabled"]:
            self.crop = RandomCropKeepVisible(crop_cfg["min_scale"], crop_cfg["max_scale"], crop_cfg["min_visible"])
            self.crop_max_tries = crop_cfg["max_tries"]
            if not isinstance(self.crop_max_tries, int) or self.crop_max_tries < 1:
                raise UserError(f"stage.views.crop.max_tries: got {self.crop_max_tries!r}; expected an int >= 1")
        self.indices = [
            index
            for index, image_id in enumerate(dataset.image_ids)
            if image_id in proposals and len(proposals[image_id]) > 0
        ]
        if not self.indices:
            raise UserError(f"{dataset.source}: no image has a proposal; expected at least one for pre-training")
        skipped = len(dataset) - len(self.indices)
        if skipped:
            log.info("two views: %d of %d images have no proposal and are skipped", skipped, len(dataset))

    def __len__(self) -> int:
        return len(self.indices)

    def _base(self, index: int) -> tuple[Tensor, Target]:
        image_id = self.dataset.image_ids[index]
        image = torch.from_numpy(self.dataset.load_image(index)).permute(2, 0, 1).float().div_(255)
        boxes = torch.as_tensor(np.asarray(self.proposals[image_id]), dtype=torch.float32).reshape(-1, 4)
        size = torch.tensor(image.shape[-2:], dtype=torch.int64)
        if self.labels is None:
            labels = torch.zeros(len(boxes), dtype=torch.int64)
        else:
            labels = torch.as_tensor(np.asarray(self.labels[image_id]), dtype=torch.int64).reshape(-1)
            if len(labels) != len(boxes):
                raise ValueError(f"image {image_id}: {len(labels)} pseudo-classes for {len(boxes)} proposals")
        target = {
            "boxes": boxes,
            "ids": torch.arange(len(boxes), dtype=torch.int64),
            "labels": labels,
            "image_id": int(image_id),
            "orig_size": size,
            "size": size.clone(),
        }
        return image, target

    def _crop(self, image: Tensor, target: Target, must_share: Tensor | None) -> tuple[Tensor, Target]:
        """A crop that keeps a proposal (and, given `must_share`, one of those ids); else the whole image."""
        height, width = image.shape[-2:]
        for _ in range(self.crop_max_tries):
            cropped, cropped_target = self.crop.apply(image, target, self.crop.sample_window(height, width))
            ids = cropped_target["ids"]
            if len(ids) > 0 and (must_share is None or bool(torch.isin(ids, must_share).any())):
                return cropped, cropped_target
        return image, target

    def _view(self, image: Tensor, target: Target, which: int, must_share: Tensor | None) -> tuple[Tensor, Target]:
        if self.crop is not None:
            image, target = self._crop(image, target, must_share)
        image, target = self.view_transforms[which](image, target)
        target = dict(target)  # the transforms may hand back the shared input dict
        if not len(target["boxes"]) == len(target["ids"]) == len(target["labels"]):
            raise RuntimeError(f"view transforms {self.view_transforms[which]} changed the number of boxes")
        height, width = image.shape[-2:]
        target["boxes"] = clip_boxes(target["boxes"], height, width)
        target["size"] = torch.tensor([height, width], dtype=torch.int64)
        return image, target

    def __getitem__(self, item: int) -> tuple[Tensor, Target, Tensor, Target]:
        image, target = self._base(self.indices[item])
        image1, target1 = self._view(image, target, 0, must_share=None)
        image2, target2 = self._view(image, target, 1, must_share=target1["ids"])
        return image1, target1, image2, target2


def collate_two_view(
    batch: Sequence[tuple[Tensor, Target, Tensor, Target]],
) -> tuple[list[Tensor], list[Target], list[Tensor], list[Target]]:
    """(images1, targets1, images2, targets2) lists from a list of `TwoViewDataset` items."""
    images1, targets1, images2, targets2 = (list(column) for column in zip(*batch, strict=True))
    return images1, targets1, images2, targets2


def build_view_transforms(views_cfg: Any) -> Compose:
    """One view's pipeline from `stage.views`: resize (short side from `min_sizes`, long side at most
    `max_size`), horizontal flip with `flip_prob`, then photometric jitter (left out when all factors are 0).
    Build it twice for two views: each draws its own random parameters."""
    min_sizes = list(views_cfg.min_sizes)
    if not min_sizes or any(not isinstance(s, int) or s <= 0 for s in min_sizes):
        raise UserError(f"stage.views.min_sizes: got {min_sizes}; expected a non-empty list of positive ints")
    if not isinstance(views_cfg.max_size, int) or views_cfg.max_size < max(min_sizes):
        raise UserError(f"stage.views.max_size: got {views_cfg.max_size!r}; expected an int >= max(min_sizes)")
    if not 0 <= views_cfg.flip_prob <= 1:
        raise UserError(f"stage.views.flip_prob: got {views_cfg.flip_prob}; expected a probability in [0, 1]")
    transforms: list[ViewTransform] = [
        RandomResize(min_sizes, views_cfg.max_size),
        RandomHorizontalFlip(views_cfg.flip_prob),
    ]
    factors = (views_cfg.brightness, views_cfg.contrast, views_cfg.saturation, views_cfg.hue)
    if any(factors):
        if min(factors) < 0 or views_cfg.hue > 0.5:
            raise UserError(f"stage.views: jitter factors {factors}; expected all >= 0 and hue <= 0.5")
        transforms.append(PhotometricJitter(*factors))
    return Compose(transforms)


def build_two_view_dataset(
    dataset: Any,
    proposals: Mapping[Any, np.ndarray],
    views_cfg: Any,
    labels: Mapping[Any, np.ndarray] | None = None,
) -> TwoViewDataset:
    """`TwoViewDataset` with two independent pipelines from `stage.views` and its optional `crop` block;
    `labels`: the proposals' pseudo-classes (None: every label 0)."""
    return TwoViewDataset(
        dataset,
        proposals,
        build_view_transforms(views_cfg),
        build_view_transforms(views_cfg),
        crop_cfg=views_cfg.crop,
        labels=labels,
    )
