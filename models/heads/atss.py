"""ATSS auxiliary head (Co-DETR's first and best auxiliary head; Sense-X/Co-DETR `CoATSSHead`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from models.heads.common import PaddedTargets
from models.heads.dense import DenseAuxHead
from models.layers.tv_detection import BoxCoder
from models.matching.assigners import ATSSAssigner
from models.matching.priors import DensePriors, StrideAnchorGenerator


class ATSSAuxHead(DenseAuxHead):
    """One square anchor per location (side `octave_base_scale` x stride), assigned by ATSS.

    Regression: (dx, dy, dw, dh) deltas to the anchor with torchvision's BoxCoder (`box_coder_weights` are
    1 / mmdet's target_stds, e.g. [10, 10, 5, 5] for stds [0.1, 0.1, 0.2, 0.2]), trained through the decoded box.
    Losses (mmdet ATSSHead):
    - `loss_cls`: sigmoid focal loss over every valid anchor, summed, / number of positives;
    - `loss_bbox`: GIoU of decoded boxes, weighted by each positive's centre-ness target, / the sum of those
      targets (at least 1);
    - `loss_centerness`: BCE of the centre-ness logit against the anchor centre's centre-ness in its box,
      summed, / number of positives.
    Each is multiplied by its `weight_*` (the reference folds lambda2 x decoder layers into them).
    Positives: the positive anchors with the features of their map cells.
    The other arguments (name, widths, tower, focal and loss-weight settings) are DenseAuxHead's.
    """

    def __init__(
        self,
        strides: list[int],
        octave_base_scale: float,
        anchor_center_offset: float,
        topk: int,
        box_coder_weights: list[float],
        **dense_args: Any,
    ):
        super().__init__(
            strides=strides,
            prior_generator=StrideAnchorGenerator.from_octave_scales(
                strides, octave_base_scale, 1, [1.0], anchor_center_offset
            ),
            **dense_args,
        )
        self.assigner = ATSSAssigner(topk)
        self.box_coder = BoxCoder(tuple(float(w) for w in box_coder_weights))

    def assign_image(self, priors: DensePriors, index: Tensor, gt_boxes: Tensor) -> Tensor:
        per_level = torch.bincount(priors.levels[index], minlength=len(priors.num_per_level)).tolist()
        return self.assigner.assign(priors.boxes[index], per_level, gt_boxes)

    def compute_losses(
        self,
        cls: Tensor,
        reg: Tensor,
        ctr: Tensor | None,
        priors: DensePriors,
        matched: Tensor,
        gt: PaddedTargets,
    ) -> dict[str, Tensor]:
        loss_cls, num_pos = self.classification_loss(cls, matched, gt)
        image, prior, target_boxes = self.positives(matched, gt)
        pred_boxes = self.box_coder.decode_single(reg[image, prior], priors.boxes[prior])
        return self.centerness_weighted_losses(
            loss_cls, num_pos, pred_boxes, target_boxes, priors.centers[prior], ctr[image, prior], min_ctr_norm=1.0
        )
