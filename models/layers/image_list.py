"""Pad a list of differently sized images into one batch tensor with a padding mask."""

from __future__ import annotations

import torch
from torch import Tensor


def batch_images(images: list[Tensor], size_divisibility: int) -> tuple[Tensor, Tensor, list[tuple[int, int]]]:
    """Stack CHW images into [B, C, H, W], zero-padded at the bottom and right.

    H and W are the largest height and width in the list, rounded up to a multiple of `size_divisibility`
    (0 or 1: no rounding). Returns (batch, mask Bool[B, H, W] True on padding, [(h, w)] of each image).
    """
    if not images:
        raise ValueError("batch_images: got an empty list of images; expected at least one")
    channels = {img.shape[0] for img in images}
    if len(channels) != 1 or any(img.dim() != 3 for img in images):
        raise ValueError(
            f"batch_images: expected CHW images with one channel count; got {[tuple(i.shape) for i in images]}"
        )
    sizes = [(int(img.shape[1]), int(img.shape[2])) for img in images]
    max_h = max(h for h, _ in sizes)
    max_w = max(w for _, w in sizes)
    if size_divisibility > 1:
        max_h = -(-max_h // size_divisibility) * size_divisibility
        max_w = -(-max_w // size_divisibility) * size_divisibility
    first = images[0]
    batch = first.new_zeros((len(images), channels.pop(), max_h, max_w))
    mask = torch.ones((len(images), max_h, max_w), dtype=torch.bool, device=first.device)
    for i, (img, (h, w)) in enumerate(zip(images, sizes)):
        batch[i, :, :h, :w].copy_(img)
        mask[i, :h, :w] = False
    return batch, mask, sizes


def size_table(sizes: list[tuple[int, int]], like: Tensor, dtype: torch.dtype) -> Tensor:
    """[[a, b], ...] as an [L, 2] tensor on `like`'s device. Built from scalars on the device: no copy from the
    host (which would wait for the GPU), and sizes that are symbolic in an export stay symbolic."""
    return torch.stack(
        [torch.stack([like.new_full((), a, dtype=dtype), like.new_full((), b, dtype=dtype)]) for a, b in sizes]
    )
