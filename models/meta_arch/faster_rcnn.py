"""Faster R-CNN (torchvision's RPN and RoI heads) on ResNet + FPN, with AlignDet support, built from the same
Faster R-CNN parts as the Co-DETR auxiliary head (models/heads/rcnn.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from models.heads.rcnn import ProposalNetwork, box_head, match_rois
from models.layers.backbone import ResNetBackbone, pyramid_strides
from models.layers.tv_detection import (
    BalancedPositiveNegativeSampler,
    GeneralizedRCNN,
    LastLevelMaxPool,
    MultiScaleRoIAlign,
    RoIHeads,
    RPNHead,
    fastrcnn_loss,
)
from models.matching.assigners import MaxIoUAssigner
from models.matching.priors import StrideAnchorGenerator
from models.meta_arch.fpn_common import (
    FPNDetectorMixin,
    NoResizeTransform,
    check_levels,
    check_loss_weights,
    fpn,
)
from models.pretrain.align_outputs import (
    DEFAULT_ALIGN_OPTIONS,
    AlignOptions,
    AlignOutputs,
    reject_pseudo_classes,
)


class FasterRCNNDetector(FPNDetectorMixin, GeneralizedRCNN):
    """torchvision's Faster R-CNN with an FPN on backbone levels (normally [2, 3, 4, 5]) + a max-pooled level;
    the RPN uses every level, RoIAlign the backbone levels.

    Args:
        backbone: ResNetBackbone.
        num_classes: C; labels 0..C-1 outside (torchvision's background class 0 is added inside).
        fpn_channels: FPN width.
        anchor_sizes: RPN anchor size per pyramid level (px); aspect_ratios: height / width, every level.
        rpn_*: torchvision's RPN settings (matching IoUs, sampled anchors per image and positive fraction,
            top-n before / after NMS in training and testing, NMS IoU, score threshold).
        roi_output_size, roi_sampling_ratio: MultiScaleRoIAlign.
        representation_size: width of the TwoMLPHead box features.
        box_*: torchvision's RoI head settings (matching IoUs, sampled RoIs per image and positive fraction,
            score threshold, NMS IoU, detections per image); bbox_reg_weights: the delta coder weights.
        align_rois_per_image: box-domain pre-training keeps at most this many positive RoIs per image (drawn at
            random; the reference's sampler of 4096 with positive fraction 1).
        loss_weights: {"objectness", "rpn_box_reg", "classifier", "box_reg"} -> weight.
        pixel_mean, pixel_std, size_divisibility: as FCOSDetector.

    Training losses: `faster_rcnn/loss_{objectness,rpn_box_reg,classifier,box_reg}`.
    """

    LOSS_NAMES = ("objectness", "rpn_box_reg", "classifier", "box_reg")
    NUM_EXTRA_LEVELS = 1  # max-pooled P6

    def __init__(
        self,
        backbone: ResNetBackbone,
        num_classes: int,
        fpn_channels: int,
        anchor_sizes: Sequence[float],
        aspect_ratios: Sequence[float],
        rpn_fg_iou_thresh: float,
        rpn_bg_iou_thresh: float,
        rpn_batch_size_per_image: int,
        rpn_positive_fraction: float,
        rpn_pre_nms_top_n_train: int,
        rpn_pre_nms_top_n_test: int,
        rpn_post_nms_top_n_train: int,
        rpn_post_nms_top_n_test: int,
        rpn_nms_thresh: float,
        rpn_score_thresh: float,
        roi_output_size: int,
        roi_sampling_ratio: int,
        representation_size: int,
        box_fg_iou_thresh: float,
        box_bg_iou_thresh: float,
        box_batch_size_per_image: int,
        box_positive_fraction: float,
        bbox_reg_weights: Sequence[float],
        box_score_thresh: float,
        box_nms_thresh: float,
        box_detections_per_img: int,
        align_rois_per_image: int,
        loss_weights: Mapping[str, float],
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        size_divisibility: int,
        align_drop_keys: Sequence[str],
    ) -> None:
        strides = pyramid_strides(backbone, self.NUM_EXTRA_LEVELS)
        check_levels("anchor_sizes", anchor_sizes, len(strides))
        anchors = StrideAnchorGenerator.from_sizes(strides, [[s] for s in anchor_sizes], aspect_ratios)
        rpn = ProposalNetwork(
            RPNHead(fpn_channels, anchors.num_per_location),
            anchors,
            MaxIoUAssigner(rpn_fg_iou_thresh, rpn_bg_iou_thresh, low_quality="torchvision"),
            rpn_batch_size_per_image,
            rpn_positive_fraction,
            pre_nms_top_n={"training": rpn_pre_nms_top_n_train, "testing": rpn_pre_nms_top_n_test},
            post_nms_top_n={"training": rpn_post_nms_top_n_train, "testing": rpn_post_nms_top_n_test},
            nms_thresh=rpn_nms_thresh,
            score_thresh=rpn_score_thresh,
        )
        head, predictor = box_head(fpn_channels, roi_output_size, representation_size, num_classes)
        roi_heads = RoIHeads(
            MultiScaleRoIAlign([f"p{level}" for level in backbone.out_levels], roi_output_size, roi_sampling_ratio),
            head,
            predictor,
            box_fg_iou_thresh,
            box_bg_iou_thresh,
            box_batch_size_per_image,
            box_positive_fraction,
            tuple(float(w) for w in bbox_reg_weights),
            box_score_thresh,
            box_nms_thresh,
            box_detections_per_img,
        )
        roi_heads.proposal_matcher = MaxIoUAssigner(box_fg_iou_thresh, box_bg_iou_thresh)
        super().__init__(backbone, rpn, roi_heads, NoResizeTransform(pixel_mean, pixel_std, size_divisibility))
        self.kind = "faster_rcnn"
        self.label_offset = 1
        self.neck = fpn(backbone, fpn_channels, LastLevelMaxPool())
        self.loss_weights = check_loss_weights(loss_weights, self.LOSS_NAMES)
        self.transfer_drop_keys = list(align_drop_keys)
        self.representation_size = representation_size
        # Positives only (fraction 1, negatives marked ignored), as the reference's RoI sampler for pre-training.
        self.align_sampler = BalancedPositiveNegativeSampler(align_rois_per_image, 1.0)

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        image_list, tv_targets = self._forward_inputs(images, targets)
        features = self.pyramid(image_list.tensors)
        proposals, rpn_losses = self.rpn(image_list, features, tv_targets)
        detections, roi_losses = self.roi_heads(features, proposals, image_list.image_sizes, tv_targets)
        if self.training:
            return self._weighted({**rpn_losses, **roi_losses})
        return [
            {"boxes": d["boxes"], "scores": d["scores"], "labels": d["labels"] - self.label_offset} for d in detections
        ]

    # ---- AlignDet ----

    def align_outputs(
        self,
        images: list[Tensor],
        targets: list[dict[str, Tensor]],
        with_losses: bool,
        options: AlignOptions = DEFAULT_ALIGN_OPTIONS,
    ) -> AlignOutputs:
        """The RPN runs as in training against the proposals (its losses are part of `losses`; its proposal
        counts follow the module's mode). RoIs = the RPN's proposals plus the proposals themselves; those the RoI
        matcher makes positive (at most `align_rois_per_image` per image) give branch "rcnn": their TwoMLPHead
        features, ids = their matched proposal's id. Loss: the RoI box regression of those positives on the
        pseudo-class their proposal carries. with_losses needs training mode (the RPN computes losses only then).
        """
        reject_pseudo_classes(options, self)
        if with_losses and not self.training:
            raise ValueError("FasterRCNNDetector.align_outputs: with_losses=True needs training mode")
        image_list, tv_targets = self._prepare(images, targets)
        features = self.pyramid(image_list.tensors)
        proposals, rpn_losses = self.rpn(image_list, features, tv_targets)
        gt_boxes = [t["boxes"].to(proposals[0].dtype) for t in tv_targets]
        rois, matched = match_rois(proposals, gt_boxes, self.roi_heads.proposal_matcher, add_gt_as_proposals=True)
        # Labels for the sampler: 1 positive, -1 ignored; with fraction 1 it draws positives only.
        keep_masks, _ = self.align_sampler([torch.where(m >= 0, 1, -1) for m in matched])
        keep = [torch.where(mask)[0] for mask in keep_masks]
        pos_rois = [r[k] for r, k in zip(rois, keep)]
        pos_matched = [m[k] for m, k in zip(matched, keep)]
        box_features = self.roi_heads.box_head(self.roi_heads.box_roi_pool(features, pos_rois, image_list.image_sizes))
        ids = torch.cat([t["ids"].to(m.device)[m] for t, m in zip(targets, pos_matched)])
        losses = {}
        if with_losses:
            class_logits, box_regression = self.roi_heads.box_predictor(box_features)
            if box_features.shape[0] == 0:
                # No positive RoI in the batch (no proposals at all): a zero that keeps the graph connected.
                loss_box_reg = box_regression.sum() * 0.0
            else:
                labels = [t["labels"][m] for t, m in zip(tv_targets, pos_matched)]
                regression_targets = self.roi_heads.box_coder.encode(
                    [g[m] for g, m in zip(gt_boxes, pos_matched)], pos_rois
                )
                # torchvision's RoI loss; its classification term (on the classifier the projector replaces) is
                # not used.
                _, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
            losses = self._weighted({**rpn_losses, "box_reg": loss_box_reg})
        return AlignOutputs(features={"rcnn": box_features}, ids={"rcnn": ids}, losses=losses)

    def align_feature_dims(self) -> dict[str, int]:
        return {"rcnn": self.representation_size}
