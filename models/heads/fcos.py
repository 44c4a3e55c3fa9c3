"""FCOS auxiliary head (Co-DETR paper Tables 7-8; not in the released code)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from models.heads.common import PaddedTargets
from models.heads.dense import DenseAuxHead
from models.matching.assigners import FCOSAssigner
from models.matching.priors import DensePriors, StridePointGenerator


class FCOSAuxHead(DenseAuxHead):
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
    The other arguments (name, widths, tower, focal and loss-weight settings) are DenseAuxHead's.
    """

    def __init__(
        self,
        strides: list[int],
        point_center_offset: float,
        point_box_scale: float,
        regress_ranges: list[list[float]],
        center_sampling: bool,
        center_sample_radius: float,
        **dense_args: Any,
    ):
        super().__init__(
            strides=strides,
            prior_generator=StridePointGenerator(strides, point_center_offset, point_box_scale),
            **dense_args,
        )
        if len(regress_ranges) != len(self.strides):
            raise ValueError(
                f"FCOSAuxHead: {len(regress_ranges)} regress_ranges for {len(self.strides)} levels; expected one per level"
            )
        self.regress_ranges = [[float(low), float(high)] for low, high in regress_ranges]
        self.assigner = FCOSAssigner(center_sampling, center_sample_radius)

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
        image, prior, target_boxes = self.positives(matched, gt)
        points = priors.centers[prior]
        pred_boxes = self.decode(reg[image, prior], points, priors.strides[prior])
        # mmdet normalises by the centre-ness sum with only a tiny floor (ATSS uses a floor of 1).
        return self.centerness_weighted_losses(
            loss_cls, num_pos, pred_boxes, target_boxes, points, ctr[image, prior], min_ctr_norm=1e-6
        )
