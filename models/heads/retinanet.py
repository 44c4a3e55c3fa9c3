"""RetinaNet auxiliary head (Co-DETR paper Table 8; not in the released code)."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torchvision.ops import generalized_box_iou_loss

from models.heads.common import PaddedTargets
from models.heads.dense import DenseAuxHead
from models.layers.tv_detection import BoxCoder
from models.matching.assigners import MaxIoUAssigner
from models.matching.priors import DensePriors, StrideAnchorGenerator


class RetinaNetAuxHead(DenseAuxHead):
    """Anchors of `scales_per_octave` octave scales x `aspect_ratios` per location, max-IoU assignment.

    Assignment: MaxIoUAssigner(pos_iou_thr, neg_iou_thr, min_pos_iou, low-quality matches on), 0.5 / 0.4 / 0 in
    the paper's setting; anchors between the thresholds are ignored by the classification loss.
    Regression: BoxCoder deltas decoded to boxes (weights = 1 / mmdet target_stds).
    Losses: `loss_cls` sigmoid focal over positive and negative anchors, summed, / number of positives;
    `loss_bbox` GIoU of the decoded positive boxes, summed, / number of positives; each times its `weight_*`.
    Positives: the positive anchors with the features of their map cells (several anchors share a cell).
    The other arguments (name, widths, tower, focal and loss-weight settings) are DenseAuxHead's.
    """

    def __init__(
        self,
        strides: list[int],
        octave_base_scale: float,
        scales_per_octave: int,
        aspect_ratios: list[float],
        anchor_center_offset: float,
        pos_iou_thr: float,
        neg_iou_thr: float,
        min_pos_iou: float,
        box_coder_weights: list[float],
        **dense_args: Any,
    ):
        anchors = StrideAnchorGenerator.from_octave_scales(
            strides, octave_base_scale, scales_per_octave, list(aspect_ratios), anchor_center_offset
        )
        super().__init__(strides=strides, prior_generator=anchors, **dense_args)
        self.assigner = MaxIoUAssigner(pos_iou_thr, neg_iou_thr, min_pos_iou, low_quality="mmdet")
        self.box_coder = BoxCoder(tuple(float(w) for w in box_coder_weights))

    def assign_image(self, priors: DensePriors, index: Tensor, gt_boxes: Tensor) -> Tensor:
        return self.assigner.assign(priors.boxes[index], gt_boxes)

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
        loss_bbox = generalized_box_iou_loss(pred_boxes, target_boxes, reduction="sum")
        return {
            "loss_cls": self.weight_cls * loss_cls / num_pos,
            "loss_bbox": self.weight_bbox * loss_bbox / num_pos,
        }
