"""FCOS auxiliary head (Co-DETR paper Tables 7-8; not in the released code)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss

from models.heads.assigners import FCOSAssigner
from models.heads.common import PaddedTargets, centerness_target, mean_over_processes
from models.heads.dense import DenseAuxHead, DenseTower
from models.heads.priors import DensePriors, PointGenerator


class FCOSHead(DenseAuxHead):
    """One point per location, FCOS assignment (centre sampling, per-level regress ranges, smallest box wins).

    Regression: distances (l, t, r, b) = exp(scaled output) x stride from the point, decoded to a box.
    Losses (mmdet FCOSHead with GIoU):
    - `loss_cls`: sigmoid focal over every valid point, summed, / number of positives;
    - `loss_bbox`: GIoU of decoded boxes weighted by the centre-ness targets, / their sum;
    - `loss_centerness`: BCE of the centre-ness logit (on the regression branch), summed, / number of positives.
    Each is multiplied by its `weight_*`.
    Positives: the positive points as squares of side `point_box_scale` x stride centred on the point (Co-DETR's
    reference box for FCOS), with the features of their map cells.
    `regress_ranges`: one [low, high] per level, in pixels of the largest point-to-edge distance.
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
        point_center_offset: float,
        point_box_scale: float,
        regress_ranges: list[list[float]],
        center_sampling: bool,
        center_sample_radius: float,
        focal_alpha: float,
        focal_gamma: float,
        weight_cls: float,
        weight_bbox: float,
        weight_centerness: float,
        max_negatives: int,
    ):
        super().__init__(name, num_classes, in_channels, strides, max_negatives)
        if len(regress_ranges) != len(self.strides):
            raise ValueError(
                f"FCOSHead: {len(regress_ranges)} regress_ranges for {len(self.strides)} levels; expected one per level"
            )
        self.prior_generator = PointGenerator(self.strides, point_center_offset, point_box_scale)
        self.tower = DenseTower(
            in_channels,
            feat_channels or in_channels,
            stacked_convs,
            num_groups,
            len(self.strides),
            1,
            num_classes,
            with_centerness=True,
            prior_prob=prior_prob,
        )
        self.regress_ranges = [[float(low), float(high)] for low, high in regress_ranges]
        self.assigner = FCOSAssigner(center_sampling, center_sample_radius)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.weight_cls = weight_cls
        self.weight_bbox = weight_bbox
        self.weight_centerness = weight_centerness

    def assign_image(self, priors: DensePriors, index: Tensor, gt_boxes: Tensor) -> Tensor:
        ranges = torch.tensor(self.regress_ranges, device=index.device)[priors.levels[index]]
        return self.assigner.assign(priors.centers[index], priors.strides[index], ranges, gt_boxes)

    def decode(self, reg: Tensor, points: Tensor, strides: Tensor) -> Tensor:
        """Boxes [P, 4] from regression outputs [P, 4] at points [P, 2] of the given strides [P]."""
        distances = reg.exp() * strides[:, None]
        return torch.cat([points - distances[:, :2], points + distances[:, 2:]], dim=1)

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
        points = priors.centers[prior]
        pred_boxes = self.decode(reg[image, prior], points, priors.strides[prior])
        ctr_target = centerness_target(points, target_boxes)
        giou = generalized_box_iou_loss(pred_boxes, target_boxes, reduction="none")
        # mmdet normalises by the centre-ness sum with only a tiny floor (ATSS uses a floor of 1).
        ctr_norm = mean_over_processes(ctr_target.sum()).clamp(min=1e-6)
        loss_ctr = F.binary_cross_entropy_with_logits(ctr[image, prior], ctr_target, reduction="sum")
        return {
            "loss_cls": self.weight_cls * loss_cls / num_pos,
            "loss_bbox": self.weight_bbox * (giou * ctr_target).sum() / ctr_norm,
            "loss_centerness": self.weight_centerness * loss_ctr / num_pos,
        }
