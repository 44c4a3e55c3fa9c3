"""FCOS (torchvision's) on backbone levels + P6/P7, one point per location, with AlignDet support."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss

from models.errors import ModelConfigError
from models.layers.backbone import ResNetBackbone, pyramid_strides
from models.layers.tv_detection import (
    FCOS,
    BoxLinearCoder,
    FCOSClassificationHead,
    FCOSHead,
    FCOSRegressionHead,
)
from models.matching.assigners import BACKGROUND, FCOSAssigner
from models.matching.priors import StridePointGenerator, TorchvisionAnchors
from models.meta_arch.fpn_common import (
    DenseFPNDetectorMixin,
    group_norm,
)
from models.pretrain.align_outputs import (
    DEFAULT_ALIGN_OPTIONS,
    AlignOptions,
    AlignOutputs,
    reject_pseudo_classes,
    with_background,
)

REGRESSION_ACTIVATIONS = ("relu", "exp")


class ExpConv2d(nn.Conv2d):
    """A convolution whose output goes through exp: FCOS's distance regressor as mmdet's FCOSHead
    (norm_on_bbox=False) and the AlignDet reference have it. torchvision's head applies relu after it, which leaves
    exp's positive output unchanged, so this swaps the activation without touching the head's forward or its
    state-dict keys."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).exp()


class ConfigurableNormFCOSHead(FCOSHead):
    """torchvision's FCOSHead with the towers' normalisation (FCOSHead fixes GroupNorm(32)) and the distance
    regressor's activation chosen here: relu (torchvision) or exp (see ExpConv2d)."""

    def __init__(
        self, in_channels: int, num_classes: int, num_convs: int, norm_layer, regression_activation: str
    ) -> None:
        # FCOSHead.__init__ would build GroupNorm(32) towers first; set up the same three members directly.
        nn.Module.__init__(self)
        self.box_coder = BoxLinearCoder(normalize_by_size=True)
        self.classification_head = FCOSClassificationHead(in_channels, 1, num_classes, num_convs, norm_layer=norm_layer)
        self.regression_head = FCOSRegressionHead(in_channels, 1, num_convs, norm_layer=norm_layer)
        if regression_activation == "exp":
            conv = self.regression_head.bbox_reg
            exp_regressor = ExpConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding)
            exp_regressor.load_state_dict(conv.state_dict())  # torchvision's init: N(0, 0.01), bias 0
            self.regression_head.bbox_reg = exp_regressor


class FCOSDetector(DenseFPNDetectorMixin, FCOS):
    """torchvision's FCOS on backbone levels + P6/P7 (made from P5), one point per location.

    Args:
        backbone: ResNetBackbone (its out_levels, normally [3, 4, 5], are the FPN inputs).
        num_classes: C; labels 0..C-1 (sigmoid classifier, no background class).
        fpn_channels: FPN and head width.
        num_convs: convolutions in each head tower.
        head_norm_groups: GroupNorm groups in the towers (torchvision: 32 on 256 channels); null: none.
        center_sampling_radius: a point is positive only within radius x its stride of the box centre.
        regress_range: (low, high): a point of stride s takes boxes whose largest point-to-side distance lies in
            (low x s, high x s); the first level starts at 0, the last is unbounded (torchvision: 4, 8).
        score_thresh, nms_thresh, detections_per_img, topk_candidates: postprocessing (torchvision's meaning).
        loss_weights: {"classification", "bbox_regression", "bbox_ctrness"} -> weight.
        regression_activation: "relu" (torchvision: distances start near 0 and, with GIoU's vanishing gradient for
            tiny boxes, can stay there) or "exp" (mmdet's FCOSHead default and the AlignDet reference: distances
            start near one stride), applied to the (l, t, r, b) outputs in strides.
        pixel_mean, pixel_std: RGB normalisation of the [0, 1] inputs; size_divisibility: batch padding.

    Training losses: `fcos/loss_classification` (focal), `fcos/loss_bbox_regression` (GIoU),
    `fcos/loss_bbox_ctrness` (BCE), each / number of positive points. Eval: per image {"boxes", "scores",
    "labels"} in the input image's pixels.
    """

    LOSS_NAMES = ("classification", "bbox_regression", "bbox_ctrness")
    NUM_EXTRA_LEVELS = 2  # P6, P7

    def __init__(
        self,
        backbone: ResNetBackbone,
        num_classes: int,
        fpn_channels: int,
        num_convs: int,
        head_norm_groups: int | None,
        center_sampling_radius: float,
        regress_range: Sequence[float],
        score_thresh: float,
        nms_thresh: float,
        detections_per_img: int,
        topk_candidates: int,
        loss_weights: Mapping[str, float],
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        size_divisibility: int,
        align_drop_keys: Sequence[str],
        regression_activation: str,
    ) -> None:
        if regression_activation not in REGRESSION_ACTIVATIONS:
            raise ModelConfigError(
                "regression_activation", f"got {regression_activation!r}; expected one of {REGRESSION_ACTIVATIONS}"
            )
        strides = pyramid_strides(backbone, self.NUM_EXTRA_LEVELS)
        head = ConfigurableNormFCOSHead(
            fpn_channels, num_classes, num_convs, group_norm(fpn_channels, head_norm_groups), regression_activation
        )
        super().__init__(
            backbone,
            num_classes,
            head=head,
            center_sampling_radius=center_sampling_radius,
            score_thresh=score_thresh,
            nms_thresh=nms_thresh,
            detections_per_img=detections_per_img,
            topk_candidates=topk_candidates,
        )
        # An FCOS "anchor" is the point's square of side = stride (torchvision's: its regress range scales with
        # it); torchvision accepts only its own generator class at construction, so ours is set here.
        self.anchor_generator = TorchvisionAnchors(StridePointGenerator(strides, center_offset=0.0, box_scale=1.0))
        self.assigner = FCOSAssigner(True, center_sampling_radius, convention="torchvision")
        if len(regress_range) != 2 or not 0 <= regress_range[0] < regress_range[1]:
            raise ModelConfigError("regress_range", f"got {list(regress_range)}; expected [low, high], 0 <= low < high")
        self.regress_range = (float(regress_range[0]), float(regress_range[1]))
        self._add_pyramid_and_transform(
            "fcos", backbone, fpn_channels, loss_weights, pixel_mean, pixel_std, size_divisibility
        )
        self.transfer_drop_keys = list(align_drop_keys)

    def match(
        self, anchors: list[Tensor], targets: list[dict[str, Tensor]], num_anchors_per_level: list[int]
    ) -> list[Tensor]:
        """FCOS point assignment in torchvision's convention (models/matching/assigners.py FCOSAssigner): a point
        of stride s may take a box in whose centre region it lies and whose largest point-to-side distance is in
        (low x s, high x s) (from 0 on the first level, unbounded on the last); among several the smallest box
        wins. Returns per image [P] int64: the box index, or -1."""
        low, high = self.regress_range
        matched = []
        for points, target in zip(anchors, targets):
            sizes = points[:, 2] - points[:, 0]
            lower = sizes * low
            lower[: num_anchors_per_level[0]] = 0
            upper = sizes * high
            upper[-num_anchors_per_level[-1] :] = float("inf")
            centers = (points[:, :2] + points[:, 2:]) / 2
            matched.append(self.assigner.assign(centers, sizes, torch.stack([lower, upper], dim=1), target["boxes"]))
        return matched

    def compute_loss(self, targets, head_outputs, anchors, num_anchors_per_level):
        return self.head.compute_loss(
            targets, head_outputs, anchors, self.match(anchors, targets, num_anchors_per_level)
        )

    # ---- AlignDet ----

    def align_outputs(
        self,
        images: list[Tensor],
        targets: list[dict[str, Tensor]],
        with_losses: bool,
        options: AlignOptions = DEFAULT_ALIGN_OPTIONS,
    ) -> AlignOutputs:
        """Branch "fcos": the classification tower's output at every point `match` assigns to a proposal (the
        input of the classifier the projector replaces), then up to `options.max_background` background points.
        Losses: GIoU box regression and centerness on the assigned points, as in training (no classification
        loss)."""
        reject_pseudo_classes(options, self)
        batch = self.align_batch(images, targets)
        matched = torch.stack(batch.matched)  # [B, P]
        positive = matched >= 0
        losses = {}
        if with_losses:
            bbox_regression, bbox_ctrness = self.head.regression_head(batch.features)
            matched_boxes = torch.cat([t["boxes"][m[m >= 0]] for t, m in zip(batch.tv_targets, batch.matched)])
            points = torch.stack(batch.anchors)[positive]
            losses = self._weighted(
                self._box_losses(bbox_regression[positive], bbox_ctrness[positive, 0], points, matched_boxes)
            )
        features, ids = with_background(
            batch.tower[positive], batch.ids[positive], batch.tower[matched == BACKGROUND], options.max_background
        )
        return AlignOutputs(features={"fcos": features}, ids={"fcos": ids}, losses=losses)

    def _box_losses(self, regression: Tensor, ctrness: Tensor, points: Tensor, boxes: Tensor) -> dict[str, Tensor]:
        """The box half of torchvision's FCOSHead.compute_loss on positives only: GIoU of the decoded boxes and
        BCE of the centerness logits against the centerness of the point in its box, each / number of points."""
        num = max(1, points.shape[0])
        pred_boxes = self.box_coder.decode(regression, points)
        loss_giou = generalized_box_iou_loss(pred_boxes, boxes, reduction="sum") / num
        distances = self.box_coder.encode(points, boxes)
        left_right, top_bottom = distances[:, [0, 2]], distances[:, [1, 3]]
        ctr_target = torch.sqrt(
            (left_right.amin(dim=1) / left_right.amax(dim=1)) * (top_bottom.amin(dim=1) / top_bottom.amax(dim=1))
        )
        loss_ctr = F.binary_cross_entropy_with_logits(ctrness, ctr_target, reduction="sum") / num
        return {"bbox_regression": loss_giou, "bbox_ctrness": loss_ctr}

    def align_feature_dims(self) -> dict[str, int]:
        return {"fcos": self.fpn_channels}
