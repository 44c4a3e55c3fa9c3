"""ATSS auxiliary head (Co-DETR's first and best auxiliary head; Sense-X/Co-DETR `CoATSSHead`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import generalized_box_iou_loss

from models.heads.assigners import ATSSAssigner
from models.heads.common import PaddedTargets, centerness_target, mean_over_processes
from models.heads.dense import DenseAuxHead, DenseTower
from models.heads.priors import AnchorGenerator, DensePriors


class ATSSHead(DenseAuxHead):
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
        anchor_center_offset: float,
        topk: int,
        box_coder_weights: list[float],
        focal_alpha: float,
        focal_gamma: float,
        weight_cls: float,
        weight_bbox: float,
        weight_centerness: float,
        max_negatives: int,
    ):
        super().__init__(name, num_classes, in_channels, strides, max_negatives)
        self.prior_generator = AnchorGenerator(self.strides, octave_base_scale, 1, [1.0], anchor_center_offset)
        self.tower = DenseTower(
            in_channels,
            feat_channels or in_channels,
            stacked_convs,
            num_groups,
            len(self.strides),
            self.prior_generator.num_per_location,
            num_classes,
            with_centerness=True,
            prior_prob=prior_prob,
        )
        self.assigner = ATSSAssigner(topk)
        self.box_coder = BoxCoder(tuple(float(w) for w in box_coder_weights))
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.weight_cls = weight_cls
        self.weight_bbox = weight_bbox
        self.weight_centerness = weight_centerness

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

        image, prior = (matched >= 0).nonzero(as_tuple=True)
        target_boxes = gt.boxes[image, matched[image, prior]]
        pred_boxes = self.box_coder.decode_single(reg[image, prior], priors.boxes[prior])
        ctr_target = centerness_target(priors.centers[prior], target_boxes)
        giou = generalized_box_iou_loss(pred_boxes, target_boxes, reduction="none")
        ctr_norm = mean_over_processes(ctr_target.sum()).clamp(min=1.0)
        loss_ctr = F.binary_cross_entropy_with_logits(ctr[image, prior], ctr_target, reduction="sum")
        return {
            "loss_cls": self.weight_cls * loss_cls / num_pos,
            "loss_bbox": self.weight_bbox * (giou * ctr_target).sum() / ctr_norm,
            "loss_centerness": self.weight_centerness * loss_ctr / num_pos,
        }
