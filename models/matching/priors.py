"""The one prior generator: anchors or points laid on feature maps at explicit strides, for every dense head and
RPN in the package (the Co-DETR auxiliary heads and the standalone FCOS, RetinaNet and Faster R-CNN).

torchvision's AnchorGenerator infers each level's stride as padded_size // map_size, which is wrong for coarse
levels whose maps were rounded up (e.g. a 192-pixel side at stride 128 gives a 2-cell map, and 192 // 2 = 96),
so every stride here is given.

Ordering (a contract with the heads' flattened predictions): level, then row y, then column x, then the
prior within the location; i.e. the order of `map.permute(0, 2, 3, 1)` reshaped, levels concatenated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.layers.tv_detection import ImageList


@dataclass
class DensePriors:
    """All priors of a batch's maps (shared by its images).

    `boxes` [N, 4] xyxy pixels (anchors, or the square box given to a point), `centers` [N, 2], `strides` [N]
    float, `levels` [N] int64, `locations` [N] int64 index of the prior's map cell in the levels' cells
    concatenated (level-major, row-major), `num_per_level` list[int] priors per level.
    """

    boxes: Tensor
    centers: Tensor
    strides: Tensor
    levels: Tensor
    locations: Tensor
    num_per_level: list[int]


def _location_grid(
    feature_shapes: list[tuple[int, int]], strides: list[int], center_offset: float, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """Cell centres [M, 2] ((x + offset) * stride, (y + offset) * stride), strides [M] and levels [M]."""
    centers, cell_strides, levels = [], [], []
    for level, ((height, width), stride) in enumerate(zip(feature_shapes, strides)):
        ys = (torch.arange(height, device=device, dtype=torch.float32) + center_offset) * stride
        xs = (torch.arange(width, device=device, dtype=torch.float32) + center_offset) * stride
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        centers.append(torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1))
        cell_strides.append(torch.full((height * width,), float(stride), device=device))
        levels.append(torch.full((height * width,), level, dtype=torch.int64, device=device))
    return torch.cat(centers), torch.cat(cell_strides), torch.cat(levels)


def _cell_anchors(scales: Tensor, aspect_ratios: Tensor) -> Tensor:
    """[A, 4] boxes (-w/2, -h/2, w/2, h/2) centred on 0: for each ratio r (= h / w), then each scale s, a box of
    area s^2 (ratios vary slowest; torchvision's and mmdet's order)."""
    heights = (aspect_ratios.sqrt()[:, None] * scales[None, :]).reshape(-1)
    widths = ((1 / aspect_ratios.sqrt())[:, None] * scales[None, :]).reshape(-1)
    return torch.stack([-widths, -heights, widths, heights], dim=1) / 2


class StrideAnchorGenerator:
    """Anchors: level l's `cell_anchors[l]` ([A, 4] xyxy offsets in pixels) placed on every cell centre
    ((x + center_offset) * stride_l, (y + center_offset) * stride_l). Called with the maps' (H, W) shapes, it
    returns their `DensePriors`.

    The two anchor conventions of the package are two constructors:
    - `from_octave_scales` (mmdet; the Co-DETR auxiliary heads): scales relative to the stride, no rounding;
    - `from_sizes` (torchvision; the standalone RetinaNet and Faster R-CNN): sizes in pixels per level, each
      anchor's corners rounded to whole pixels, centres at (x, y) * stride.
    """

    def __init__(self, strides: Sequence[int], cell_anchors: Sequence[Tensor], center_offset: float) -> None:
        if len(cell_anchors) != len(strides):
            raise ValueError(f"StrideAnchorGenerator: {len(cell_anchors)} levels of anchors for {len(strides)} strides")
        if len({int(c.shape[0]) for c in cell_anchors}) != 1:
            raise ValueError("StrideAnchorGenerator: every level needs the same number of anchors per location")
        self.strides = [int(s) for s in strides]
        self.cell_anchors = torch.stack(list(cell_anchors))  # [L, A, 4]
        self.center_offset = center_offset

    @classmethod
    def from_octave_scales(
        cls,
        strides: Sequence[int],
        octave_base_scale: float,
        scales_per_octave: int,
        aspect_ratios: Sequence[float],
        center_offset: float,
    ) -> StrideAnchorGenerator:
        """Per location, for each ratio and each octave scale k, a box of side (area^0.5)
        stride x octave_base_scale x 2^(k / scales_per_octave) (mmdet's AnchorGenerator)."""
        scales = torch.tensor([octave_base_scale * 2 ** (k / scales_per_octave) for k in range(scales_per_octave)])
        unit = _cell_anchors(scales, torch.tensor([float(r) for r in aspect_ratios]))  # in strides
        return cls(strides, [unit * float(s) for s in strides], center_offset)

    @classmethod
    def from_sizes(
        cls, strides: Sequence[int], sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[float]
    ) -> StrideAnchorGenerator:
        """Per location of level l, for each ratio and each size in `sizes[l]` (pixels), a box of that side,
        corners rounded to whole pixels, centred on (x, y) * stride (torchvision's AnchorGenerator, strides
        given)."""
        ratios = torch.as_tensor([float(r) for r in aspect_ratios], dtype=torch.float32)
        cells = [_cell_anchors(torch.as_tensor(level, dtype=torch.float32), ratios).round() for level in sizes]
        return cls(strides, cells, center_offset=0.0)

    @property
    def num_per_location(self) -> int:
        return int(self.cell_anchors.shape[1])

    def __call__(self, feature_shapes: list[tuple[int, int]], device: torch.device) -> DensePriors:
        centers, strides, levels = _location_grid(feature_shapes, self.strides, self.center_offset, device)
        per_cell = self.num_per_location
        offsets = self.cell_anchors.to(device)[levels]  # [M, A, 4]
        boxes = centers.repeat(1, 2)[:, None, :] + offsets
        return DensePriors(
            boxes=boxes.reshape(-1, 4),
            centers=centers.repeat_interleave(per_cell, dim=0),
            strides=strides.repeat_interleave(per_cell),
            levels=levels.repeat_interleave(per_cell),
            locations=torch.arange(centers.shape[0], device=device).repeat_interleave(per_cell),
            num_per_level=[h * w * per_cell for h, w in feature_shapes],
        )


class StridePointGenerator:
    """FCOS points at the cell centres ((x + center_offset) * stride, ...); each point's box is the square of side
    `box_scale` x stride centred on it: 8 x stride is the reference box Co-DETR uses for FCOS positives, 1 x stride
    with offset 0 torchvision's FCOS anchors (whose side sets the point's regress range)."""

    def __init__(self, strides: Sequence[int], center_offset: float, box_scale: float) -> None:
        self.strides = [int(s) for s in strides]
        self.center_offset = center_offset
        self.box_scale = box_scale

    num_per_location = 1

    def __call__(self, feature_shapes: list[tuple[int, int]], device: torch.device) -> DensePriors:
        centers, strides, levels = _location_grid(feature_shapes, self.strides, self.center_offset, device)
        half = (strides * self.box_scale / 2)[:, None]
        return DensePriors(
            boxes=torch.cat([centers - half, centers + half], dim=1),
            centers=centers,
            strides=strides,
            levels=levels,
            locations=torch.arange(centers.shape[0], device=device),
            num_per_level=[h * w for h, w in feature_shapes],
        )


def valid_location_mask(
    feature_shapes: list[tuple[int, int]],
    strides: list[int],
    image_sizes: list[tuple[int, int]],
    device: torch.device,
) -> Tensor:
    """[B, M] bool over the concatenated cells: True where the cell lies on the image, not in the batch padding.

    Cell (y, x) of a level at stride s is valid for an image of (h, w) when y < ceil(h / s) and x < ceil(w / s)
    (mmdet's valid flags).
    """
    masks = []
    for (height, width), stride in zip(feature_shapes, strides):
        rows = torch.tensor([min(math.ceil(h / stride), height) for h, _ in image_sizes], device=device)
        cols = torch.tensor([min(math.ceil(w / stride), width) for _, w in image_sizes], device=device)
        row_ok = torch.arange(height, device=device)[None, :] < rows[:, None]  # [B, H]
        col_ok = torch.arange(width, device=device)[None, :] < cols[:, None]  # [B, W]
        masks.append((row_ok[:, :, None] & col_ok[:, None, :]).reshape(len(image_sizes), -1))
    return torch.cat(masks, dim=1)


class TorchvisionAnchors(nn.Module):
    """A StrideAnchorGenerator or StridePointGenerator called as torchvision's detectors call theirs:
    forward(image_list, feature_maps) -> one [N, 4] tensor per image (the same for all), in the maps' dtype."""

    def __init__(self, generator: StrideAnchorGenerator | StridePointGenerator) -> None:
        super().__init__()
        self.generator = generator

    def num_anchors_per_location(self) -> list[int]:
        return [self.generator.num_per_location] * len(self.generator.strides)

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        shapes = [(int(f.shape[-2]), int(f.shape[-1])) for f in feature_maps]
        boxes = self.generator(shapes, feature_maps[0].device).boxes.to(feature_maps[0].dtype)
        return [boxes for _ in image_list.image_sizes]
