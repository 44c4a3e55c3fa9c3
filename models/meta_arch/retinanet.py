"""RetinaNet (torchvision's) on backbone levels + P6/P7, with AlignDet support."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torchvision.ops import box_iou

from models.errors import ModelConfigError
from models.layers.backbone import ResNetBackbone, pyramid_strides
from models.layers.tv_detection import RetinaNet, RetinaNetHead
from models.matching.assigners import BACKGROUND, MaxIoUAssigner
from models.matching.priors import StrideAnchorGenerator, TorchvisionAnchors
from models.meta_arch.fpn_common import (
    DenseFPNDetectorMixin,
    check_levels,
    group_norm,
)
from models.pretrain.align_outputs import (
    DEFAULT_ALIGN_OPTIONS,
    AlignOptions,
    AlignOutputs,
    reject_pseudo_classes,
    with_background,
)

BOX_LOSS_TYPES = ("l1", "smooth_l1", "giou", "ciou", "diou")


class RetinaNetDetector(DenseFPNDetectorMixin, RetinaNet):
    """torchvision's RetinaNet on backbone levels + P6/P7 (made from P5).

    Args:
        backbone: ResNetBackbone (out_levels normally [3, 4, 5]).
        num_classes: C; labels 0..C-1 (sigmoid classifier, no background class).
        fpn_channels: FPN and head width.
        anchor_sizes: base anchor size per pyramid level (px); anchor_scales: multipliers of it (the octave
            scales 2^(i/3)); aspect_ratios: height / width. A = len(scales) x len(ratios) anchors per location.
        head_norm_groups: GroupNorm groups in the towers (torchvision v2: 32 on 256 channels); null: none (v1).
        bbox_reg_loss: one of l1 (v1), smooth_l1, giou (v2), ciou, diou.
        fg_iou_thresh, bg_iou_thresh: anchor matching (IoU >= fg positive, < bg negative, between ignored; each
            box also keeps its best anchors).
        score_thresh, nms_thresh, detections_per_img, topk_candidates: postprocessing.
        loss_weights: {"classification", "bbox_regression"} -> weight.
        pixel_mean, pixel_std, size_divisibility: as FCOSDetector.

    Training losses: `retinanet/loss_classification` (focal), `retinanet/loss_bbox_regression`.
    """

    LOSS_NAMES = ("classification", "bbox_regression")
    NUM_EXTRA_LEVELS = 2  # P6, P7

    def __init__(
        self,
        backbone: ResNetBackbone,
        num_classes: int,
        fpn_channels: int,
        anchor_sizes: Sequence[float],
        anchor_scales: Sequence[float],
        aspect_ratios: Sequence[float],
        head_norm_groups: int | None,
        bbox_reg_loss: str,
        fg_iou_thresh: float,
        bg_iou_thresh: float,
        score_thresh: float,
        nms_thresh: float,
        detections_per_img: int,
        topk_candidates: int,
        loss_weights: Mapping[str, float],
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        size_divisibility: int,
        align_drop_keys: Sequence[str],
    ) -> None:
        strides = pyramid_strides(backbone, self.NUM_EXTRA_LEVELS)
        check_levels("anchor_sizes", anchor_sizes, len(strides))
        if bbox_reg_loss not in BOX_LOSS_TYPES:
            raise ModelConfigError("bbox_reg_loss", f"got {bbox_reg_loss!r}; expected one of {BOX_LOSS_TYPES}")
        sizes = [[float(base) * float(scale) for scale in anchor_scales] for base in anchor_sizes]
        anchors = StrideAnchorGenerator.from_sizes(strides, sizes, aspect_ratios)
        num_anchors = anchors.num_per_location
        head = RetinaNetHead(
            fpn_channels, num_anchors, num_classes, norm_layer=group_norm(fpn_channels, head_norm_groups)
        )
        # torchvision's own v2 builder selects the regression loss through this attribute.
        head.regression_head._loss_type = bbox_reg_loss
        super().__init__(
            backbone,
            num_classes,
            head=head,
            score_thresh=score_thresh,
            nms_thresh=nms_thresh,
            detections_per_img=detections_per_img,
            fg_iou_thresh=fg_iou_thresh,
            bg_iou_thresh=bg_iou_thresh,
            topk_candidates=topk_candidates,
        )
        # torchvision accepts only its own anchor generator and matcher classes at construction; ours are set here.
        self.anchor_generator = TorchvisionAnchors(anchors)
        self.proposal_matcher = MaxIoUAssigner(fg_iou_thresh, bg_iou_thresh, low_quality="torchvision")
        self._add_pyramid_and_transform(
            "retinanet", backbone, fpn_channels, loss_weights, pixel_mean, pixel_std, size_divisibility
        )
        self.transfer_drop_keys = list(align_drop_keys)
        self.num_anchors = num_anchors

    def match(
        self, anchors: list[Tensor], targets: list[dict[str, Tensor]], num_anchors_per_level: list[int] | None = None
    ) -> list[Tensor]:
        """Max-IoU anchor matching in torchvision's convention: per image [num_anchors] int64, the box index for
        positives, -1 below bg_iou_thresh, -2 between the thresholds (ignored). Levels play no part."""
        matched = []
        for anchors_per_image, target in zip(anchors, targets):
            if target["boxes"].numel() == 0:
                matched.append(
                    torch.full((anchors_per_image.shape[0],), -1, dtype=torch.int64, device=anchors_per_image.device)
                )
            else:
                matched.append(self.proposal_matcher(box_iou(target["boxes"], anchors_per_image)))
        return matched

    def compute_loss(self, targets, head_outputs, anchors, num_anchors_per_level=None):
        return self.head.compute_loss(targets, head_outputs, anchors, self.match(anchors, targets))

    # ---- AlignDet ----

    def align_outputs(
        self,
        images: list[Tensor],
        targets: list[dict[str, Tensor]],
        with_losses: bool,
        options: AlignOptions = DEFAULT_ALIGN_OPTIONS,
    ) -> AlignOutputs:
        """Branch "retinanet": the classification tower's output at each location holding an anchor that `match`
        makes positive, one row per (location, proposal id) pair: the reference gives each of the A anchors its
        own embedding from a per-anchor classifier, here the A anchors of a location share the tower feature the
        projector sees. Then up to `options.max_background` background locations: those with a background anchor
        and no positive one (a location's shared feature cannot be both). Loss: the configured box regression
        loss on the positive anchors."""
        reject_pseudo_classes(options, self)
        batch = self.align_batch(images, targets)
        num_locations = batch.tower.shape[1]
        matched = torch.stack(batch.matched)  # [B, L * A], anchors of a location consecutive
        image_index, anchor_index = torch.nonzero(matched >= 0, as_tuple=True)
        location = image_index * num_locations + anchor_index // self.num_anchors
        # Sorted unique (location, id) pairs: still image-major, one row per location and proposal.
        pairs = torch.unique(torch.stack([location, batch.ids[image_index, anchor_index]], dim=1), dim=0)
        losses = {}
        if with_losses:
            bbox_regression = self.head.regression_head(batch.features)
            outputs = {"bbox_regression": bbox_regression}
            loss = self.head.regression_head.compute_loss(batch.tv_targets, outputs, batch.anchors, batch.matched)
            losses = self._weighted({"bbox_regression": loss})
        per_location = matched.view(matched.shape[0], num_locations, self.num_anchors)
        background = (per_location == BACKGROUND).any(dim=2) & ~(per_location >= 0).any(dim=2)  # [B, L]
        features, ids = with_background(
            batch.tower.flatten(0, 1)[pairs[:, 0]], pairs[:, 1], batch.tower[background], options.max_background
        )
        return AlignOutputs(features={"retinanet": features}, ids={"retinanet": ids}, losses=losses)

    def align_feature_dims(self) -> dict[str, int]:
        return {"retinanet": self.fpn_channels}
