"""Box conversions shared by the DETR family: pixel xyxy <-> normalised cxcywh, and the logit of a box.

DETR predicts boxes as (cx, cy, w, h) in [0, 1] relative to each image's own, unpadded size; losses and
matching use that form, while datasets and evaluation use xyxy pixels.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """log(x / (1 - x)) with x clamped to [eps, 1 - eps], so boxes at 0 or 1 give finite logits."""
    x = x.clamp(min=eps, max=1 - eps)
    return torch.log(x / (1 - x))


def normalize_boxes(boxes_xyxy: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Pixel xyxy [N, 4] -> cxcywh [N, 4] divided by the image's (h, w)."""
    h, w = image_size
    scale = boxes_xyxy.new_tensor([w, h, w, h])
    return box_convert(boxes_xyxy, "xyxy", "cxcywh") / scale


def denormalize_boxes(boxes_cxcywh: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Normalised cxcywh [..., 4] -> pixel xyxy [..., 4] for an image of (h, w); no clipping."""
    h, w = image_size
    scale = boxes_cxcywh.new_tensor([w, h, w, h])
    return box_convert(boxes_cxcywh, "cxcywh", "xyxy") * scale
