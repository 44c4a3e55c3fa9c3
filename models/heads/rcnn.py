"""The Faster R-CNN parts both Faster R-CNNs are built from: the standalone detector (models/meta_arch/
faster_rcnn.py) and the Co-DETR auxiliary head (models/heads/faster_rcnn.py).

- `ProposalNetwork`: torchvision's RPN (head, proposal filtering, losses) on the package's anchors
  (`StrideAnchorGenerator`) and assigner (`MaxIoUAssigner`);
- `box_head`: the RoI box head and predictor;
- `match_rois`: RoIs (proposals plus, optionally, the ground-truth boxes) and the box each is assigned.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou

from models.heads.common import float32_region
from models.layers.tv_detection import (
    BoxCoder,
    FastRCNNPredictor,
    RegionProposalNetwork,
    RPNHead,
    TwoMLPHead,
    concat_box_prediction_layers,
)
from models.matching.assigners import BACKGROUND, MaxIoUAssigner
from models.matching.priors import StrideAnchorGenerator, TorchvisionAnchors, valid_location_mask


class ProposalNetwork(RegionProposalNetwork):
    """torchvision's RPN with the package's anchors and assigner.

    Labels: 1 for assigned anchors, 0 for BACKGROUND, -1 (not sampled) for ignored anchors; the sampler draws
    `batch_size_per_image` with at most `positive_fraction` positives per image. Losses: `loss_objectness` BCE
    mean over sampled anchors; `loss_rpn_box_reg` smooth-L1 (`smooth_l1_beta`; torchvision's 1/9, 0 = L1 as
    mmdet) of the deltas of sampled positives, summed, / number of sampled anchors.

    Two ways in:
    - `forward(images, features, targets)`: torchvision's, for the standalone detector (losses in training mode);
    - `propose(features, image_sizes, targets)`: for the Co-DETR head on the adapter's maps: anchors in the
      batch padding take no part in the assignment (mmdet's valid flags), the maths after the head runs in
      float32, and the losses are always computed.
    """

    def __init__(
        self,
        head: RPNHead,
        anchors: StrideAnchorGenerator,
        assigner: MaxIoUAssigner,
        batch_size_per_image: int,
        positive_fraction: float,
        pre_nms_top_n: dict[str, int],
        post_nms_top_n: dict[str, int],
        nms_thresh: float,
        score_thresh: float = 0.0,
        box_coder_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        smooth_l1_beta: float = 1 / 9,
    ) -> None:
        super().__init__(
            TorchvisionAnchors(anchors),
            head,
            fg_iou_thresh=assigner.pos_iou_thr,
            bg_iou_thresh=assigner.neg_iou_thr,
            batch_size_per_image=batch_size_per_image,
            positive_fraction=positive_fraction,
            pre_nms_top_n=pre_nms_top_n,
            post_nms_top_n=post_nms_top_n,
            nms_thresh=nms_thresh,
            score_thresh=score_thresh,
        )
        self.proposal_matcher = assigner
        self.box_coder = BoxCoder(tuple(float(w) for w in box_coder_weights))
        self.smooth_l1_beta = smooth_l1_beta

    @property
    def anchors(self) -> StrideAnchorGenerator:
        return self.anchor_generator.generator

    def assign_targets_to_anchors(
        self, anchors: list[Tensor], targets: list[dict[str, Tensor]], valid: Tensor | None = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Per image: labels [N] (1 / 0 / -1) and the box each anchor regresses to (its own anchor unless it is
        positive). `valid` [B, N] (optional): only those anchors are assigned, the others get -1."""
        if valid is None:
            return super().assign_targets_to_anchors(anchors, targets)
        labels, matched_boxes = [], []
        for image_anchors, image_valid, target in zip(anchors, valid, targets):
            index = image_valid.nonzero().squeeze(1)
            gt_boxes = target["boxes"].to(image_anchors)
            matched = self.proposal_matcher.assign(image_anchors[index], gt_boxes)
            image_labels = torch.full((image_anchors.shape[0],), -1.0, device=image_anchors.device)
            image_labels[index] = torch.where(matched >= 0, 1.0, torch.where(matched == BACKGROUND, 0.0, -1.0))
            # Non-positive anchors regress onto themselves so their (unused) targets stay finite.
            boxes = image_anchors.clone()
            boxes[index[matched >= 0]] = gt_boxes[matched[matched >= 0]]
            labels.append(image_labels)
            matched_boxes.append(boxes)
        return labels, matched_boxes

    def compute_loss(
        self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: list[Tensor], regression_targets: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        sampled_pos, sampled_neg = self.fg_bg_sampler(labels)
        sampled_pos = torch.where(torch.cat(sampled_pos))[0]
        sampled = torch.cat([sampled_pos, torch.where(torch.cat(sampled_neg))[0]])
        labels_all = torch.cat(labels)
        targets_all = torch.cat(regression_targets)
        count = max(sampled.numel(), 1)
        objectness_loss = (
            F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels_all[sampled], reduction="sum")
            / count
        )
        box_loss = (
            F.smooth_l1_loss(
                pred_bbox_deltas[sampled_pos], targets_all[sampled_pos], beta=self.smooth_l1_beta, reduction="sum"
            )
            / count
        )
        return objectness_loss, box_loss

    def propose(
        self, features: list[Tensor], image_sizes: list[tuple[int, int]], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Proposals per image [n_i, 4] (detached) and the losses, from maps of a padded batch without an
        ImageList (see the class docstring)."""
        device = features[0].device
        shapes = [(int(f.shape[-2]), int(f.shape[-1])) for f in features]
        objectness, deltas = self.head(features)
        anchors = self.anchors(shapes, device).boxes
        num_anchors_per_level = [o[0].numel() for o in objectness]
        with float32_region(device):
            objectness, deltas = concat_box_prediction_layers(objectness, deltas)
            objectness, deltas = objectness.float(), deltas.float()
            batch = len(image_sizes)
            proposals = self.box_coder.decode_single(deltas.detach(), anchors.repeat(batch, 1)).view(batch, -1, 4)
            boxes, _ = self.filter_proposals(proposals, objectness, image_sizes, num_anchors_per_level)
            valid = valid_location_mask(shapes, self.anchors.strides, image_sizes, device)
            valid = valid.repeat_interleave(self.anchors.num_per_location, dim=1)
            labels, matched_boxes = self.assign_targets_to_anchors([anchors] * batch, targets, valid)
            regression_targets = [self.box_coder.encode_single(m, anchors) for m in matched_boxes]
            objectness_loss, box_loss = self.compute_loss(objectness, deltas, labels, regression_targets)
        return boxes, {"loss_objectness": objectness_loss, "loss_rpn_box_reg": box_loss}


def box_head(
    in_channels: int, roi_output_size: int, representation_size: int, num_classes: int
) -> tuple[TwoMLPHead, FastRCNNPredictor]:
    """The RoI box head (two FC layers of `representation_size` on the pooled S x S RoI) and its predictor
    (scores over C + 1 classes, background = 0, and class-specific box deltas), built in that order."""
    head = TwoMLPHead(in_channels * roi_output_size**2, representation_size)
    return head, FastRCNNPredictor(representation_size, num_classes + 1)


def match_rois(
    proposals: list[Tensor], gt_boxes: list[Tensor], assigner: MaxIoUAssigner, add_gt_as_proposals: bool
) -> tuple[list[Tensor], list[Tensor]]:
    """Per image: the RoIs (the proposals, then the ground-truth boxes when `add_gt_as_proposals`) and the index
    of the box each was assigned (the assigners' convention: >= 0, BACKGROUND or IGNORE). IoUs are taken in
    the boxes' own dtype."""
    rois, matched = [], []
    for boxes, gt in zip(proposals, gt_boxes):
        if add_gt_as_proposals:
            boxes = torch.cat([boxes, gt])
        if gt.numel() and boxes.numel():
            matched.append(assigner(box_iou(gt, boxes)))
        else:
            matched.append(torch.full((boxes.shape[0],), BACKGROUND, dtype=torch.int64, device=boxes.device))
        rois.append(boxes)
    return rois, matched
