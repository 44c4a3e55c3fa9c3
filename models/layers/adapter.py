"""Co-DETR's multi-scale adapter: the encoder memory back into feature maps for the auxiliary heads (§3.2)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class _Upsample(nn.Module):
    """x2 bilinear interpolation, then 3x3 conv + GroupNorm (the paper's upsampling for single-scale encoders)."""

    def __init__(self, channels: int, num_groups: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = nn.GroupNorm(num_groups, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)))


class MultiScaleAdapter(nn.Module):
    """Split the encoder memory into per-level maps and extend the pyramid.

    forward(memory [B, S, C], spatial_shapes [L, 2] (h, w) int, level_start_index [L]) -> list of
    [B, C, H, W] maps, finest first:
    `num_levels_up` upsampled maps (each x2 bilinear + 3x3 conv + GroupNorm, chained up from the finest encoder
    level), then the L encoder levels (the memory slices reshaped, values unchanged), then `num_levels_down`
    downsampled maps (each 3x3 stride-2 conv + GroupNorm, chained down from the coarsest encoder level).

    - Multi-scale encoder (Deformable-DETR, the released code): num_levels_down = 1, num_levels_up = 0.
    - Single-scale encoder (e.g. a C5 DETR): the paper's ViTDet-style pyramid, e.g. up 2 and down 2 turn
      stride 32 into strides 8..128.
    `output_strides(input_strides)` gives the strides of the returned maps.
    """

    def __init__(self, d_model: int, num_groups: int, num_levels_down: int = 1, num_levels_up: int = 0):
        super().__init__()
        if num_levels_down < 0 or num_levels_up < 0:
            raise ValueError(f"MultiScaleAdapter: level counts {num_levels_down}, {num_levels_up}; expected >= 0")
        self.down = nn.ModuleList(
            nn.Sequential(nn.Conv2d(d_model, d_model, 3, stride=2, padding=1), nn.GroupNorm(num_groups, d_model))
            for _ in range(num_levels_down)
        )
        self.up = nn.ModuleList(_Upsample(d_model, num_groups) for _ in range(num_levels_up))

    def output_strides(self, input_strides: list[int]) -> list[int]:
        """Strides of forward's maps for encoder levels at `input_strides` (finest first, each x2 the previous)."""
        finest, coarsest = int(input_strides[0]), int(input_strides[-1])
        ups = [finest // 2 ** (i + 1) for i in range(len(self.up))][::-1]
        downs = [coarsest * 2 ** (i + 1) for i in range(len(self.down))]
        return ups + [int(s) for s in input_strides] + downs

    def forward(self, memory: Tensor, spatial_shapes: Tensor, level_start_index: Tensor) -> list[Tensor]:
        batch, _, channels = memory.shape
        maps = []
        for (height, width), start in zip(spatial_shapes.tolist(), level_start_index.tolist()):
            level = memory[:, start : start + height * width]
            maps.append(level.transpose(1, 2).reshape(batch, channels, height, width))
        finer = []
        source = maps[0]
        for up in self.up:
            source = up(source)
            finer.insert(0, source)
        coarser = []
        source = maps[-1]
        for down in self.down:
            source = down(source)
            coarser.append(source)
        return finer + maps + coarser
