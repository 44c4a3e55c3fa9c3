"""Small helpers shared by the auxiliary heads: float32 regions, padded targets, loss normalisers, sampling."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


def float32_region(device: torch.device) -> AbstractContextManager:
    """Autocast off: assignment and loss maths must not run in half precision (IoUs, exp, focal terms)."""
    return torch.autocast(device_type=device.type, enabled=False)


def mean_over_processes(value: Tensor) -> Tensor:
    """A scalar averaged over ranks when torch.distributed is initialised (mmdet's reduce_mean), else itself."""
    value = value.detach().float()
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return value


@dataclass
class PaddedTargets:
    """Ground truth of a batch padded to G = max(1, most boxes in an image), so it can be gathered per prior.

    `boxes` [B, G, 4] float32 xyxy, `labels` [B, G] int64, `counts` list of the real number of boxes per image.
    Padding rows are zeros and are never gathered (assigners only return real indices).
    """

    boxes: Tensor
    labels: Tensor
    counts: list[int]

    @staticmethod
    def from_targets(targets: list[dict[str, Tensor]], device: torch.device) -> PaddedTargets:
        counts = [int(t["boxes"].shape[0]) for t in targets]
        size = max([1, *counts])
        boxes = torch.zeros(len(targets), size, 4, dtype=torch.float32, device=device)
        labels = torch.zeros(len(targets), size, dtype=torch.int64, device=device)
        for i, (t, n) in enumerate(zip(targets, counts)):
            boxes[i, :n] = t["boxes"].to(device=device, dtype=torch.float32)
            labels[i, :n] = t["labels"].to(device=device, dtype=torch.int64)
        return PaddedTargets(boxes, labels, counts)

    def image_boxes(self, index: int) -> Tensor:
        return self.boxes[index, : self.counts[index]]


def centerness_target(points: Tensor, boxes: Tensor) -> Tensor:
    """FCOS centre-ness sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b)) of points [P, 2] inside boxes [P, 4].

    Callers pass only points strictly inside their box (positives), so every distance is positive.
    """
    left = points[:, 0] - boxes[:, 0]
    top = points[:, 1] - boxes[:, 1]
    right = boxes[:, 2] - points[:, 0]
    bottom = boxes[:, 3] - points[:, 1]
    horizontal = torch.minimum(left, right) / torch.maximum(left, right)
    vertical = torch.minimum(top, bottom) / torch.maximum(top, bottom)
    return torch.sqrt((horizontal * vertical).clamp(min=0))


def random_subset(indices: Tensor, max_count: int) -> Tensor:
    """At most `max_count` of `indices`, drawn uniformly without replacement (torch's RNG, on their device)."""
    if indices.numel() <= max_count:
        return indices
    return indices[torch.randperm(indices.numel(), device=indices.device)[:max_count]]
