"""Faster R-CNN auxiliary head (Sense-X/Co-DETR `RPNHead` + `CoStandardRoIHead`), built from the Faster R-CNN
parts of models/heads/rcnn.py that the standalone detector uses too.

The RoI stage is composed here rather than with torchvision's RoIHeads, whose training path hides the RoI
features and fixes smooth-L1 on deltas.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss

from models.heads.base import AuxHead, AuxPositives
from models.heads.common import float32_region, random_subset
from models.heads.rcnn import ProposalNetwork, box_head, match_rois
from models.layers.tv_detection import BalancedPositiveNegativeSampler, BoxCoder, MultiScaleRoIAlign, RPNHead
from models.matching.assigners import BACKGROUND, MaxIoUAssigner
from models.matching.priors import StrideAnchorGenerator


class FasterRCNNAuxHead(AuxHead):
    """RPN + RoI box head trained one-to-many; its positives are the sampled positive proposals.

    RPN: `rpn_scales_per_octave` x `rpn_aspect_ratios` anchors per location on every input level, MaxIoU
    `rpn_pos_iou_thr` / `rpn_neg_iou_thr` with low-quality matches >= `rpn_min_pos_iou`, `rpn_batch_size_per_image`
    samples; `rpn_post_nms_top_n` proposals per image after per-level NMS.
    RoI stage: ground-truth boxes are appended to the proposals (`add_gt_as_proposals`), MaxIoU with positives at
    IoU >= `rcnn_pos_iou_thr`, negatives below `rcnn_neg_iou_thr`, no low-quality matches; `rcnn_batch_size_per_image`
    samples with at most `rcnn_positive_fraction` positives. RoIAlign (`roi_output_size`, `roi_sampling_ratio`)
    on the first `num_roi_levels` maps, a box of side s going to level floor(log2(s / roi_finest_scale)) (clamped;
    mmdet's finest_scale rule), then TwoMLPHead(`representation_size`) and FastRCNNPredictor(C + 1 classes,
    background = 0, class-specific deltas as in the reference's reg_class_agnostic=False).
    Losses: `loss_rpn_cls` (BCE), `loss_rpn_bbox` (L1 on deltas), `loss_cls` (CE over sampled RoIs, mean),
    `loss_bbox` (GIoU of the decoded class-specific box of each positive, summed, / number of sampled RoIs, as
    mmdet normalises it), each times its `weight_*`.
    Positives: the sampled positive proposals (ground-truth boxes included) with their labels, assigned boxes and
    the RoIAlign output mean-pooled over its cells ([P, in_channels]); negatives: sampled background proposals.
    """

    def __init__(
        self,
        name: str,
        num_classes: int,
        in_channels: int,
        strides: list[int],
        rpn_conv_depth: int,
        rpn_octave_base_scale: float,
        rpn_scales_per_octave: int,
        rpn_aspect_ratios: list[float],
        anchor_center_offset: float,
        rpn_pos_iou_thr: float,
        rpn_neg_iou_thr: float,
        rpn_min_pos_iou: float,
        rpn_batch_size_per_image: int,
        rpn_positive_fraction: float,
        rpn_pre_nms_top_n: int,
        rpn_post_nms_top_n: int,
        rpn_nms_thresh: float,
        rpn_box_coder_weights: list[float],
        rpn_smooth_l1_beta: float,
        num_roi_levels: int,
        roi_output_size: int,
        roi_sampling_ratio: int,
        roi_finest_scale: float,
        representation_size: int,
        rcnn_pos_iou_thr: float,
        rcnn_neg_iou_thr: float,
        rcnn_batch_size_per_image: int,
        rcnn_positive_fraction: float,
        rcnn_box_coder_weights: list[float],
        add_gt_as_proposals: bool,
        weight_rpn_cls: float,
        weight_rpn_bbox: float,
        weight_cls: float,
        weight_bbox: float,
        max_negatives: int,
        align_drop_keys: Sequence[str],
    ):
        super().__init__(name, num_classes, in_channels, strides, max_negatives, align_drop_keys)
        if not 1 <= num_roi_levels <= len(self.strides):
            raise ValueError(f"FasterRCNNAuxHead: num_roi_levels {num_roi_levels}; expected 1..{len(self.strides)}")
        finest = math.log2(self.strides[0])
        if finest != int(finest):
            raise ValueError(f"FasterRCNNAuxHead: finest stride {self.strides[0]} is not a power of two")
        anchors = StrideAnchorGenerator.from_octave_scales(
            self.strides, rpn_octave_base_scale, rpn_scales_per_octave, list(rpn_aspect_ratios), anchor_center_offset
        )
        self.rpn = ProposalNetwork(
            RPNHead(in_channels, anchors.num_per_location, conv_depth=rpn_conv_depth),
            anchors,
            MaxIoUAssigner(rpn_pos_iou_thr, rpn_neg_iou_thr, rpn_min_pos_iou, low_quality="mmdet"),
            rpn_batch_size_per_image,
            rpn_positive_fraction,
            # The head runs in training only, so one top-n serves both modes.
            pre_nms_top_n={"training": rpn_pre_nms_top_n, "testing": rpn_pre_nms_top_n},
            post_nms_top_n={"training": rpn_post_nms_top_n, "testing": rpn_post_nms_top_n},
            nms_thresh=rpn_nms_thresh,
            box_coder_weights=rpn_box_coder_weights,
            smooth_l1_beta=rpn_smooth_l1_beta,
        )
        self.num_roi_levels = num_roi_levels
        # LevelMapper: level = floor(canonical_level + log2(s / canonical_scale)) - k_min, with k_min =
        # log2(finest stride); canonical_level = k_min makes it mmdet's floor(log2(s / finest_scale)).
        self.roi_pool = MultiScaleRoIAlign(
            [str(i) for i in range(num_roi_levels)],
            roi_output_size,
            roi_sampling_ratio,
            canonical_scale=roi_finest_scale,
            canonical_level=int(finest),
        )
        self.box_head, self.box_predictor = box_head(in_channels, roi_output_size, representation_size, num_classes)
        self.rcnn_assigner = MaxIoUAssigner(rcnn_pos_iou_thr, rcnn_neg_iou_thr)
        self.rcnn_sampler = BalancedPositiveNegativeSampler(rcnn_batch_size_per_image, rcnn_positive_fraction)
        self.rcnn_box_coder = BoxCoder(tuple(float(w) for w in rcnn_box_coder_weights))
        self.add_gt_as_proposals = add_gt_as_proposals
        self.weight_rpn_cls = weight_rpn_cls
        self.weight_rpn_bbox = weight_rpn_bbox
        self.weight_cls = weight_cls
        self.weight_bbox = weight_bbox

    @torch.no_grad()
    def sample_proposals(
        self, proposals: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Per image: sampled RoIs [R, 4], their matched box index [R] (BACKGROUND for negatives) and sampler
        labels [R] (class + 1 for positives, 0 for negatives)."""
        gt_boxes = [t["boxes"].to(boxes) for boxes, t in zip(proposals, targets)]
        all_rois, all_matched = match_rois(proposals, gt_boxes, self.rcnn_assigner, self.add_gt_as_proposals)
        all_labels = []
        for matched, target in zip(all_matched, targets):
            labels = torch.zeros_like(matched)
            positive = matched >= 0
            labels[positive] = target["labels"].to(matched.device)[matched[positive]] + 1
            labels[matched < BACKGROUND] = -1  # IGNORE: never sampled
            all_labels.append(labels)
        rois, matched_out, labels_out = [], [], []
        sampled_pos, sampled_neg = self.rcnn_sampler(all_labels)
        for boxes, matched, labels, pos, neg in zip(all_rois, all_matched, all_labels, sampled_pos, sampled_neg):
            keep = torch.where(pos.bool() | neg.bool())[0]
            rois.append(boxes[keep])
            matched_out.append(matched[keep])
            labels_out.append(labels[keep])
        return rois, matched_out, labels_out

    def forward(
        self,
        features: list[Tensor],
        strides: list[int],
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
    ) -> tuple[dict[str, Tensor], AuxPositives]:
        self.check_inputs(features, strides)
        device = features[0].device
        proposals, rpn_losses = self.rpn.propose(features, image_sizes, targets)
        rois, matched, labels = self.sample_proposals(proposals, targets)

        roi_maps = {str(i): features[i] for i in range(self.num_roi_levels)}
        # The padded batch's size, so MultiScaleRoIAlign infers each level's scale exactly as 1 / stride.
        padded_size = (features[0].shape[-2] * self.strides[0], features[0].shape[-1] * self.strides[0])
        roi_features = self.roi_pool(roi_maps, rois, [padded_size] * len(rois))  # [R, C, S, S]
        class_logits, box_deltas = self.box_predictor(self.box_head(roi_features))

        with float32_region(device):
            class_logits, box_deltas = class_logits.float(), box_deltas.float()
            all_rois, all_labels = torch.cat(rois).float(), torch.cat(labels)
            gt_boxes = torch.cat(
                [t["boxes"].to(all_rois)[m[m >= 0]] for t, m in zip(targets, matched)]
            )  # matched boxes of the positives, in RoI order
            count = max(all_labels.numel(), 1)
            loss_cls = F.cross_entropy(class_logits, all_labels, reduction="sum") / count
            pos = torch.where(all_labels > 0)[0]
            deltas = box_deltas.view(box_deltas.shape[0], -1, 4)[pos, all_labels[pos]]
            pred_boxes = self.rcnn_box_coder.decode_single(deltas, all_rois[pos])
            loss_bbox = generalized_box_iou_loss(pred_boxes, gt_boxes, reduction="sum") / count

        losses = {
            "loss_rpn_cls": self.weight_rpn_cls * rpn_losses["loss_objectness"],
            "loss_rpn_bbox": self.weight_rpn_bbox * rpn_losses["loss_rpn_box_reg"],
            "loss_cls": self.weight_cls * loss_cls,
            "loss_bbox": self.weight_bbox * loss_bbox,
        }
        pooled = roi_features.mean(dim=(2, 3)).split([len(r) for r in rois])
        return losses, self.collect_positives(rois, matched, labels, pooled, targets)

    def collect_positives(
        self,
        rois: list[Tensor],
        matched: list[Tensor],
        labels: list[Tensor],
        pooled: tuple[Tensor, ...],
        targets: list[dict[str, Tensor]],
    ) -> AuxPositives:
        out = AuxPositives([], [], [], [], [], [], [])
        for boxes, image_matched, image_labels, feats, target in zip(rois, matched, labels, pooled, targets):
            pos = torch.where(image_labels > 0)[0]
            neg = random_subset(torch.where(image_labels == 0)[0], self.max_negatives)
            gt_index = image_matched[pos]
            out.boxes.append(boxes[pos])
            out.labels.append(image_labels[pos] - 1)
            out.target_boxes.append(target["boxes"].to(boxes)[gt_index])
            out.gt_indices.append(gt_index)
            out.features.append(feats[pos])
            out.negative_boxes.append(boxes[neg])
            out.negative_features.append(feats[neg])
        return out
