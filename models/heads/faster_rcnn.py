"""Faster R-CNN auxiliary head (Sense-X/Co-DETR `RPNHead` + `CoStandardRoIHead`) from torchvision parts.

Reused from torchvision: `RPNHead`, `RegionProposalNetwork.filter_proposals` (per-level top-k, clip, small-box
removal, per-level NMS, top-n), `BalancedPositiveNegativeSampler`, `BoxCoder`, `MultiScaleRoIAlign`,
`TwoMLPHead`, `FastRCNNPredictor`. Replaced: anchors (explicit strides, padding ignored) and the matcher (the
shared MaxIoUAssigner, which AlignDet reuses); the RoI stage is composed here rather than subclassing RoIHeads,
whose training path hides the RoI features and fixes smooth-L1 on deltas.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers
from torchvision.ops import MultiScaleRoIAlign, generalized_box_iou_loss

from models.heads.assigners import BACKGROUND, MaxIoUAssigner
from models.heads.base import AuxHead, AuxPositives
from models.heads.common import float32_region, random_subset
from models.heads.priors import AnchorGenerator, valid_location_mask


class AuxRegionProposalNetwork(RegionProposalNetwork):
    """torchvision's RPN on explicit-stride anchors, assigned by MaxIoUAssigner, ignoring padding anchors.

    Labels: 1 for assigned anchors, 0 for BACKGROUND, -1 (not sampled) for ignored and padding anchors; the
    sampler draws `batch_size_per_image` with at most `positive_fraction` positives per image.
    Losses (unweighted): `objectness` BCE mean over sampled anchors; `box` smooth-L1 (`smooth_l1_beta`, 0 = L1,
    mmdet's choice) of the deltas of sampled positives, summed, / number of sampled anchors.
    forward(features, image_sizes, targets) -> (proposals per image [n_i, 4] detached, {"objectness", "box"}).
    """

    def __init__(
        self,
        head: RPNHead,
        anchor_generator: AnchorGenerator,
        assigner: MaxIoUAssigner,
        batch_size_per_image: int,
        positive_fraction: float,
        pre_nms_top_n: int,
        post_nms_top_n: int,
        nms_thresh: float,
        box_coder_weights: list[float],
        smooth_l1_beta: float,
    ):
        super().__init__(
            anchor_generator,  # ours: explicit strides (not an ImageList-based torchvision generator)
            head,
            fg_iou_thresh=assigner.pos_iou_thr,
            bg_iou_thresh=assigner.neg_iou_thr,
            batch_size_per_image=batch_size_per_image,
            positive_fraction=positive_fraction,
            pre_nms_top_n={"training": pre_nms_top_n, "testing": pre_nms_top_n},
            post_nms_top_n={"training": post_nms_top_n, "testing": post_nms_top_n},
            nms_thresh=nms_thresh,
        )
        # The base class's torchvision Matcher is replaced by the shared assigner (mmdet low-quality rule).
        self.proposal_matcher = assigner
        self.box_coder = BoxCoder(tuple(float(w) for w in box_coder_weights))
        self.smooth_l1_beta = smooth_l1_beta

    def assign_anchors(
        self, anchors: Tensor, valid: Tensor, targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Per image: labels [N] (1 / 0 / -1) and regression targets [N, 4] (zeros except for positives)."""
        labels, regression_targets = [], []
        for image, target in enumerate(targets):
            index = valid[image].nonzero().squeeze(1)
            gt_boxes = target["boxes"].to(anchors)
            matched = self.proposal_matcher.assign(anchors[index], gt_boxes)
            image_labels = torch.full((anchors.shape[0],), -1.0, device=anchors.device)
            image_labels[index] = torch.where(matched >= 0, 1.0, torch.where(matched == BACKGROUND, 0.0, -1.0))
            # Non-positive anchors regress onto themselves so their (unused) targets stay finite.
            matched_boxes = anchors.clone()
            pos = index[matched >= 0]
            matched_boxes[pos] = gt_boxes[matched[matched >= 0]]
            labels.append(image_labels)
            regression_targets.append(self.box_coder.encode_single(matched_boxes, anchors))
        return labels, regression_targets

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

    def forward(  # maps, image sizes and targets instead of an ImageList and a dict of maps
        self,
        features: list[Tensor],
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        device = features[0].device
        shapes = [(int(f.shape[-2]), int(f.shape[-1])) for f in features]
        objectness, deltas = self.head(features)
        anchors = self.anchor_generator(shapes, device).boxes
        num_anchors_per_level = [o[0].numel() for o in objectness]
        with float32_region(device):
            objectness, deltas = concat_box_prediction_layers(objectness, deltas)
            objectness, deltas = objectness.float(), deltas.float()
            batch = len(image_sizes)
            proposals = self.box_coder.decode_single(deltas.detach(), anchors.repeat(batch, 1)).view(batch, -1, 4)
            boxes, _ = self.filter_proposals(proposals, objectness, image_sizes, num_anchors_per_level)
            valid = valid_location_mask(shapes, self.anchor_generator.strides, image_sizes, device)
            valid = valid.repeat_interleave(self.anchor_generator.num_per_location, dim=1)
            labels, regression_targets = self.assign_anchors(anchors, valid, targets)
            objectness_loss, box_loss = self.compute_loss(objectness, deltas, labels, regression_targets)
        return boxes, {"objectness": objectness_loss, "box": box_loss}


class FasterRCNNHead(AuxHead):
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
    ):
        super().__init__(name, num_classes, in_channels, strides, max_negatives)
        if not 1 <= num_roi_levels <= len(self.strides):
            raise ValueError(f"FasterRCNNHead: num_roi_levels {num_roi_levels}; expected 1..{len(self.strides)}")
        finest = math.log2(self.strides[0])
        if finest != int(finest):
            raise ValueError(f"FasterRCNNHead: finest stride {self.strides[0]} is not a power of two")
        anchors = AnchorGenerator(
            self.strides, rpn_octave_base_scale, rpn_scales_per_octave, list(rpn_aspect_ratios), anchor_center_offset
        )
        self.rpn = AuxRegionProposalNetwork(
            RPNHead(in_channels, anchors.num_per_location, conv_depth=rpn_conv_depth),
            anchors,
            MaxIoUAssigner(rpn_pos_iou_thr, rpn_neg_iou_thr, rpn_min_pos_iou, match_low_quality=True),
            rpn_batch_size_per_image,
            rpn_positive_fraction,
            rpn_pre_nms_top_n,
            rpn_post_nms_top_n,
            rpn_nms_thresh,
            rpn_box_coder_weights,
            rpn_smooth_l1_beta,
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
        self.box_head = TwoMLPHead(in_channels * roi_output_size**2, representation_size)
        self.box_predictor = FastRCNNPredictor(representation_size, num_classes + 1)
        self.rcnn_assigner = MaxIoUAssigner(
            rcnn_pos_iou_thr, rcnn_neg_iou_thr, rcnn_pos_iou_thr, match_low_quality=False
        )
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
        rois, matched_out, labels_out, per_image = [], [], [], []
        for boxes, target in zip(proposals, targets):
            gt_boxes = target["boxes"].to(boxes)
            if self.add_gt_as_proposals:
                boxes = torch.cat([boxes, gt_boxes])
            matched = self.rcnn_assigner.assign(boxes, gt_boxes)
            labels = torch.zeros_like(matched)
            positive = matched >= 0
            labels[positive] = target["labels"].to(matched.device)[matched[positive]] + 1
            labels[matched < BACKGROUND] = -1  # IGNORE: never sampled
            per_image.append((boxes, matched, labels))
        sampled_pos, sampled_neg = self.rcnn_sampler([labels for _, _, labels in per_image])
        for (boxes, matched, labels), pos, neg in zip(per_image, sampled_pos, sampled_neg):
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
        proposals, rpn_losses = self.rpn(features, image_sizes, targets)
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
            "loss_rpn_cls": self.weight_rpn_cls * rpn_losses["objectness"],
            "loss_rpn_bbox": self.weight_rpn_bbox * rpn_losses["box"],
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
