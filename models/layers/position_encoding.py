"""Sine position encodings: of feature-map locations (with a padding mask) and of normalised boxes."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SinePositionEncoding(nn.Module):
    """The DETR sine encoding (no parameters), `d_model` channels per location or 2 x `d_model` per box.

    Args:
        d_model: channels of a map encoding; each coordinate gets d_model // 2 of them (sin/cos interleaved).
        temperature: wavelength base of the frequencies (10000 in Deformable-DETR, 20 in DINO).
        scale: normalised coordinates are multiplied by it (2 pi: one period over the image).
        offset: added to the 1-based cumulative pixel index before normalising (Deformable-DETR: -0.5,
            i.e. pixel centres).
        eps: keeps the normalisation finite for an all-padding row.

    forward(mask Bool[B, H, W], True on padding) -> [B, d_model, H, W]: (y, x) cumulative positions over the
    valid pixels, normalised by the valid height/width, so padding does not shift an image's encoding.
    encode_boxes(boxes [..., 4] normalised cxcywh) -> [..., 2 * d_model]: each of (cx, cy, w, h) encoded
    with d_model // 2 channels, concatenated in that order (Deformable-DETR's proposal embedding and
    Co-DETR's positive-query embedding).
    """

    def __init__(self, d_model: int, temperature: float, scale: float, offset: float, eps: float) -> None:
        super().__init__()
        if d_model % 2:
            raise ValueError(f"SinePositionEncoding: d_model {d_model} must be even")
        self.d_model = d_model
        self.num_feats = d_model // 2
        self.temperature = temperature
        self.scale = scale
        self.offset = offset
        self.eps = eps

    def _frequencies(self, device: torch.device) -> Tensor:
        dim_t = torch.arange(self.num_feats, dtype=torch.float32, device=device)
        return self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_feats)

    def _encode(self, coords: Tensor) -> Tensor:
        """coords [...] (already scaled) -> [..., num_feats] with sin on even and cos on odd channels."""
        pos = coords[..., None] / self._frequencies(coords.device)
        return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)

    def forward(self, mask: Tensor) -> Tensor:
        not_mask = (~mask).to(torch.float32)
        y = not_mask.cumsum(1)
        x = not_mask.cumsum(2)
        y = (y + self.offset) / (y[:, -1:, :] + self.eps) * self.scale
        x = (x + self.offset) / (x[:, :, -1:] + self.eps) * self.scale
        pos = torch.cat((self._encode(y), self._encode(x)), dim=-1)
        return pos.permute(0, 3, 1, 2).contiguous()

    def encode_boxes(self, boxes: Tensor) -> Tensor:
        pos = self._encode(boxes.to(torch.float32) * self.scale)
        return pos.flatten(-2)
