"""RetinaNet auxiliary head (Co-DETR paper Table 8; not in the released code)."""

from __future__ import annotations

from torch import Tensor
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import generalized_box_iou_loss

from models.heads.assigners import MaxIoUAssigner
from models.heads.common import PaddedTargets
from models.heads.dense import DenseAuxHead, DenseTower
from models.heads.priors import AnchorGenerator, DensePriors


class RetinaNetHead(DenseAuxHead):
    """Anchors of `scales_per_octave` octave scales x `aspect_ratios` per location, max-IoU assignment.

    Assignment: MaxIoUAssigner(pos_iou_thr, neg_iou_thr, min_pos_iou, low-quality matches on), 0.5 / 0.4 / 0 in
    the paper's setting; anchors between the thresholds are ignored by the classification loss.
    Regression: BoxCoder deltas decoded to boxes (weights = 1 / mmdet target_stds).
    Losses: `loss_cls` sigmoid focal over positive and negative anchors, summed, / number of positives;
    `loss_bbox` GIoU of the decoded positive boxes, summed, / number of positives; each times its `weight_*`.
    Positives: the positive anchors with the features of their map cells (several anchors share a cell).
    """

    def __init__(
        self,
        name: str,
        num_classes: int,
        in_channels: int,
        strides: list[int],
        feat_channels: int | None,
        stacked_convs: int,
        num_groups: int,
        prior_prob: float,
        octave_base_scale: float,
        scales_per_octave: int,
        aspect_ratios: list[float],
        anchor_center_offset: float,
        pos_iou_thr: float,
        neg_iou_thr: float,
        min_pos_iou: float,
        box_coder_weights: list[float],
        focal_alpha: float,
        focal_gamma: float,
        weight_cls: float,
        weight_bbox: float,
        max_negatives: int,
    ):
        super().__init__(name, num_classes, in_channels, strides, max_negatives)
        self.prior_generator = AnchorGenerator(
            self.strides, octave_base_scale, scales_per_octave, list(aspect_ratios), anchor_center_offset
        )
        self.tower = DenseTower(
            in_channels,
            feat_channels or in_channels,
            stacked_convs,
            num_groups,
            len(self.strides),
            self.prior_generator.num_per_location,
            num_classes,
            with_centerness=False,
            prior_prob=prior_prob,
        )
        self.assigner = MaxIoUAssigner(pos_iou_thr, neg_iou_thr, min_pos_iou, match_low_quality=True)
        self.box_coder = BoxCoder(tuple(float(w) for w in box_coder_weights))
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.weight_cls = weight_cls
        self.weight_bbox = weight_bbox

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
        image, prior = (matched >= 0).nonzero(as_tuple=True)
        target_boxes = gt.boxes[image, matched[image, prior]]
        pred_boxes = self.box_coder.decode_single(reg[image, prior], priors.boxes[prior])
        loss_bbox = generalized_box_iou_loss(pred_boxes, target_boxes, reduction="sum")
        return {
            "loss_cls": self.weight_cls * loss_cls / num_pos,
            "loss_bbox": self.weight_bbox * loss_bbox / num_pos,
        }
