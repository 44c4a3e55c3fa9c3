"""Dense priors (anchors or points) laid on the adapter's maps at explicit strides.

torchvision's AnchorGenerator infers each level's stride as padded_size // map_size, which is wrong for coarse
levels whose maps were rounded up (e.g. a 192-pixel side at stride 128 gives a 2-cell map, and 192 // 2 = 96),
so the heads use these explicit-stride generators instead (mmdet conventions).

Ordering (a contract with the heads' flattened predictions): level, then row y, then column x, then the
prior within the location; i.e. the order of `map.permute(0, 2, 3, 1)` reshaped, levels concatenated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


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


class AnchorGenerator:
    """mmdet-style anchors: per location, for each aspect ratio r (= h / w) and each octave scale k,
    a box of area (stride * octave_base_scale * 2^(k / scales_per_octave))^2 centred on the cell centre
    ((x + center_offset) * stride, (y + center_offset) * stride); ratios vary slowest. No rounding."""

    def __init__(
        self,
        strides: list[int],
        octave_base_scale: float,
        scales_per_octave: int,
        aspect_ratios: list[float],
        center_offset: float,
    ):
        self.strides = [int(s) for s in strides]
        self.center_offset = center_offset
        scales = torch.tensor([octave_base_scale * 2 ** (k / scales_per_octave) for k in range(scales_per_octave)])
        ratios = torch.tensor([float(r) for r in aspect_ratios])
        heights = (ratios.sqrt()[:, None] * scales[None, :]).reshape(-1)
        widths = ((1 / ratios.sqrt())[:, None] * scales[None, :]).reshape(-1)
        # Half-extents of the cell's anchors in units of the stride: [A, 4] as (-w/2, -h/2, w/2, h/2).
        self.unit_anchors = torch.stack([-widths, -heights, widths, heights], dim=1) / 2

    @property
    def num_per_location(self) -> int:
        return int(self.unit_anchors.shape[0])

    def __call__(self, feature_shapes: list[tuple[int, int]], device: torch.device) -> DensePriors:
        centers, strides, levels = _location_grid(feature_shapes, self.strides, self.center_offset, device)
        per_cell = self.num_per_location
        unit = self.unit_anchors.to(device)
        boxes = centers.repeat(1, 2)[:, None, :] + unit[None, :, :] * strides[:, None, None]
        return DensePriors(
            boxes=boxes.reshape(-1, 4),
            centers=centers.repeat_interleave(per_cell, dim=0),
            strides=strides.repeat_interleave(per_cell),
            levels=levels.repeat_interleave(per_cell),
            locations=torch.arange(centers.shape[0], device=device).repeat_interleave(per_cell),
            num_per_level=[h * w * per_cell for h, w in feature_shapes],
        )


class PointGenerator:
    """FCOS points at the cell centres ((x + center_offset) * stride, ...); each point's box is the square of side
    `box_scale` x stride centred on it (the reference box Co-DETR uses for FCOS positives)."""

    def __init__(self, strides: list[int], center_offset: float, box_scale: float):
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
