"""torchvision's FCOS, RetinaNet and Faster R-CNN on our ResNetBackbone plus an FPN, with AlignDet support.

Each detector subclasses its torchvision class and keeps torchvision's heads, matchers, losses and
postprocessing. What changes:
- `backbone` is our ResNetBackbone (state-dict keys `backbone.body.*`, so image_pretrain checkpoints load) and
  `neck` is torchvision's FeaturePyramidNetwork (P6/P7 convolutions for FCOS and RetinaNet, a max-pooled P6
  for Faster R-CNN);
- images are normalised and padded but never resized (our datasets resize), so boxes in and out are in the
  input image's pixels;
- anchors are placed with each level's true stride (torchvision infers it as padded size // map size, which is
  off for the coarse levels whenever the padded size is not a multiple of their stride);
- labels are contiguous 0..C-1 in and out (Faster R-CNN keeps 0 for background inside: +1 in, -1 out);
- losses are weighted and keyed `<kind>/loss_<torchvision name>`;
- `align_outputs` / `align_feature_dims` / `align_drop_keys` serve AlignDet box-domain pre-training
  (models/align_outputs.py): the detector's own assigner matches predictions to proposals, the features are
  those its classifier would see, and the losses are its box-regression losses against the proposals.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxLinearCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign, box_iou, generalized_box_iou_loss
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from models.align_outputs import AlignOutputs
from models.backbone import ResNetBackbone
from stages.errors import UserError

BOX_LOSS_TYPES = ("l1", "smooth_l1", "giou", "ciou", "diou")


# ---- shared pieces ----------------------------------------------------------------------------------------------


class NoResizeTransform(GeneralizedRCNNTransform):
    """torchvision's detection preprocessing without its resize: normalise with (image_mean, image_std) and pad
    into a batch whose sides are multiples of `size_divisible`. Boxes are left as they are."""

    def __init__(self, image_mean: Sequence[float], image_std: Sequence[float], size_divisible: int) -> None:
        # min_size / max_size only feed resize(), which is the identity here.
        super().__init__(
            min_size=(),
            max_size=0,
            image_mean=list(image_mean),
            image_std=list(image_std),
            size_divisible=size_divisible,
        )

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None):
        return image, target


class FixedStrideAnchorGenerator(AnchorGenerator):
    """torchvision's AnchorGenerator with each level's stride given rather than inferred from the padded batch.

    `sizes[l]`, `aspect_ratios[l]`: the anchors of level l (torchvision's convention: ratio = height / width);
    `strides[l]`: its stride in pixels. forward(image_list, feature_maps) -> one [sum_l H_l W_l A_l, 4] tensor per
    image, level-major, then row-major locations, then the A_l anchors of a location.
    """

    def __init__(
        self, sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[Sequence[float]], strides: Sequence[int]
    ) -> None:
        super().__init__(tuple(tuple(s) for s in sizes), tuple(tuple(a) for a in aspect_ratios))
        if len(strides) != len(self.sizes):
            raise ValueError(f"FixedStrideAnchorGenerator: {len(self.sizes)} anchor levels, {len(strides)} strides")
        self.strides = [int(s) for s in strides]

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        device = feature_maps[0].device
        grid_sizes = [list(f.shape[-2:]) for f in feature_maps]
        strides = [[torch.tensor(s, device=device), torch.tensor(s, device=device)] for s in self.strides]
        self.set_cell_anchors(feature_maps[0].dtype, device)
        anchors = torch.cat(self.grid_anchors(grid_sizes, strides))
        return [anchors for _ in image_list.image_sizes]


def _pyramid_strides(backbone: ResNetBackbone, num_extra: int) -> list[int]:
    return list(backbone.strides) + [backbone.strides[-1] * 2 ** (i + 1) for i in range(num_extra)]


def _fpn(backbone: ResNetBackbone, channels: int, extra: ExtraFPNBlock) -> FeaturePyramidNetwork:
    return FeaturePyramidNetwork(list(backbone.out_channels), channels, extra_blocks=extra)


def _check_levels(name: str, values: Sequence, num_levels: int) -> None:
    if len(values) != num_levels:
        raise UserError(
            f"model.detector.{name}: got {len(values)} entries; expected one per pyramid level ({num_levels})"
        )


def _group_norm(fpn_channels: int, groups: int | None):
    """GroupNorm(groups) for the head towers, or None (no normalisation).

    Each group needs at least two channels: the coarsest level of a small image is a 1x1 map, and GroupNorm
    refuses a group holding a single value (e.g. one image at eval time).
    """
    if groups is None:
        return None
    if fpn_channels % groups != 0 or fpn_channels < 2 * groups:
        raise UserError(
            f"model.detector.head_norm_groups: {groups} with fpn_channels {fpn_channels}; expected a divisor of "
            "fpn_channels leaving at least 2 channels per group (or null for no normalisation)"
        )
    return partial(nn.GroupNorm, groups)


class _FCOSHead(FCOSHead):
    """torchvision's FCOSHead with the towers' normalisation chosen here (FCOSHead fixes GroupNorm(32))."""

    def __init__(self, in_channels: int, num_classes: int, num_convs: int, norm_layer) -> None:
        # FCOSHead.__init__ would build GroupNorm(32) towers first; set up the same three members directly.
        nn.Module.__init__(self)
        self.box_coder = BoxLinearCoder(normalize_by_size=True)
        self.classification_head = FCOSClassificationHead(in_channels, 1, num_classes, num_convs, norm_layer=norm_layer)
        self.regression_head = FCOSRegressionHead(in_channels, 1, num_convs, norm_layer=norm_layer)


def _check_loss_weights(loss_weights: Mapping[str, float], names: Sequence[str]) -> dict[str, float]:
    weights = {str(k): float(v) for k, v in loss_weights.items()}
    if set(weights) != set(names):
        raise UserError(f"model.detector.loss_weights: got {sorted(weights)}; expected exactly {sorted(names)}")
    if any(w < 0 for w in weights.values()):
        raise UserError(f"model.detector.loss_weights: got {weights}; expected weights >= 0")
    return weights


class _TorchvisionDetectorMixin:
    """Preprocessing, features and loss naming shared by the three detectors (which set `kind`, `backbone`,
    `neck`, `transform`, `loss_weights` and `label_offset`)."""

    kind: str
    label_offset: int

    def _prepare(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None
    ) -> tuple[ImageList, list[dict[str, Tensor]] | None]:
        """Normalised, padded batch and torchvision targets (boxes, labels shifted by `label_offset`)."""
        tv_targets = None
        if targets is not None:
            tv_targets = [{"boxes": t["boxes"], "labels": t["labels"] + self.label_offset} for t in targets]
        return self.transform(images, tv_targets)

    def pyramid(self, batch: Tensor) -> OrderedDict[str, Tensor]:
        """Backbone + FPN: maps keyed "p<level>" (torchvision's extra levels: "p6", "p7" or "pool")."""
        feats = self.backbone(batch)
        return self.neck(OrderedDict((f"p{level}", f) for level, f in zip(self.backbone.out_levels, feats)))

    def _weighted(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """torchvision's loss names ("classification", "loss_box_reg", ...) -> weighted `<kind>/loss_<name>`."""
        out = {}
        for name, value in losses.items():
            name = name.removeprefix("loss_")
            out[f"{self.kind}/loss_{name}"] = self.loss_weights[name] * value
        return out

    def _require_targets(self, targets: list[dict[str, Tensor]] | None) -> None:
        if targets is None:
            raise ValueError(f"{type(self).__name__}: training mode needs targets")


def _assigned_ids(ids: Tensor, matched: Tensor) -> Tensor:
    """The proposal id of each matched prediction: `ids[matched]` where matched >= 0, -1 elsewhere."""
    out = torch.full_like(matched, -1)
    positive = matched >= 0
    out[positive] = ids.to(matched.device)[matched[positive]]
    return out


def _tower_features(tower: nn.Module, features: list[Tensor]) -> Tensor:
    """A head tower on every level, flattened like torchvision's head outputs: [B, sum_l H_l W_l, C]."""
    return torch.cat([tower(f).flatten(2) for f in features], dim=2).transpose(1, 2)


# ---- FCOS -------------------------------------------------------------------------------------------------------


class FCOSDetector(_TorchvisionDetectorMixin, FCOS):
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
    ) -> None:
        strides = _pyramid_strides(backbone, self.NUM_EXTRA_LEVELS)
        # An FCOS "anchor" is the point's square of side = stride; torchvision's regress ranges scale with it.
        anchors = FixedStrideAnchorGenerator([[s] for s in strides], [[1.0]] * len(strides), strides)
        head = _FCOSHead(fpn_channels, num_classes, num_convs, _group_norm(fpn_channels, head_norm_groups))
        super().__init__(
            backbone,
            num_classes,
            anchor_generator=anchors,
            head=head,
            center_sampling_radius=center_sampling_radius,
            score_thresh=score_thresh,
            nms_thresh=nms_thresh,
            detections_per_img=detections_per_img,
            topk_candidates=topk_candidates,
        )
        if len(regress_range) != 2 or not 0 <= regress_range[0] < regress_range[1]:
            raise UserError(
                f"model.detector.regress_range: got {list(regress_range)}; expected [low, high], 0 <= low < high"
            )
        self.kind = "fcos"
        self.label_offset = 0
        self.neck = _fpn(backbone, fpn_channels, LastLevelP6P7(fpn_channels, fpn_channels))
        self.transform = NoResizeTransform(pixel_mean, pixel_std, size_divisibility)
        self.regress_range = (float(regress_range[0]), float(regress_range[1]))
        self.loss_weights = _check_loss_weights(loss_weights, self.LOSS_NAMES)
        self.fpn_channels = fpn_channels

    def match(
        self, anchors: list[Tensor], targets: list[dict[str, Tensor]], num_anchors_per_level: list[int]
    ) -> list[Tensor]:
        """FCOS point assignment (torchvision's rule): a point is positive for a box when it lies inside it, within
        `center_sampling_radius` x its stride of the box centre, and the box's largest point-to-side distance is in
        the point's regress range; among several such boxes the smallest wins. Returns per image [P] int64: the
        box index, or -1."""
        low, high = self.regress_range
        matched = []
        for points, target in zip(anchors, targets):
            boxes = target["boxes"]
            if boxes.numel() == 0:
                matched.append(torch.full((points.shape[0],), -1, dtype=torch.int64, device=points.device))
                continue
            sizes = points[:, 2] - points[:, 0]
            centers = (points[:, :2] + points[:, 2:]) / 2
            box_centers = (boxes[:, :2] + boxes[:, 2:]) / 2
            near_center = (centers[:, None] - box_centers[None]).abs().amax(dim=2) < (
                self.center_sampling_radius * sizes[:, None]
            )
            x, y = centers[:, 0:1], centers[:, 1:2]
            dist = torch.stack([x - boxes[:, 0], y - boxes[:, 1], boxes[:, 2] - x, boxes[:, 3] - y], dim=2)
            lower = sizes * low
            lower[: num_anchors_per_level[0]] = 0
            upper = sizes * high
            upper[-num_anchors_per_level[-1] :] = float("inf")
            reach = dist.amax(dim=2)
            ok = near_center & (dist.amin(dim=2) > 0) & (reach > lower[:, None]) & (reach < upper[:, None])
            areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            smallest, index = torch.where(ok, areas[None], float("inf")).min(dim=1)
            index[torch.isinf(smallest)] = -1
            matched.append(index)
        return matched

    def compute_loss(self, targets, head_outputs, anchors, num_anchors_per_level):
        return self.head.compute_loss(
            targets, head_outputs, anchors, self.match(anchors, targets, num_anchors_per_level)
        )

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if self.training:
            self._require_targets(targets)
        image_list, tv_targets = self._prepare(images, targets if self.training else None)
        features = list(self.pyramid(image_list.tensors).values())
        head_outputs = self.head(features)
        anchors = self.anchor_generator(image_list, features)
        num_anchors_per_level = [f.shape[-2] * f.shape[-1] for f in features]
        if self.training:
            return self._weighted(self.compute_loss(tv_targets, head_outputs, anchors, num_anchors_per_level))
        split_outputs = {k: list(v.split(num_anchors_per_level, dim=1)) for k, v in head_outputs.items()}
        split_anchors = [list(a.split(num_anchors_per_level)) for a in anchors]
        # Nothing was resized, so torchvision's clipped boxes are already in the input image's pixels.
        return self.postprocess_detections(split_outputs, split_anchors, image_list.image_sizes)

    # ---- AlignDet ----

    def align_outputs(self, images: list[Tensor], targets: list[dict[str, Tensor]], with_losses: bool) -> AlignOutputs:
        """Branch "fcos": the classification tower's output at every point `match` assigns to a proposal (the
        input of the classifier the projector replaces). Losses: GIoU box regression and centerness on those
        points, as in training (no classification loss)."""
        image_list, tv_targets = self._prepare(images, targets)
        features = list(self.pyramid(image_list.tensors).values())
        anchors = self.anchor_generator(image_list, features)
        num_anchors_per_level = [f.shape[-2] * f.shape[-1] for f in features]
        matched = torch.stack(self.match(anchors, tv_targets, num_anchors_per_level))  # [B, P]
        positive = matched >= 0
        ids = torch.stack([_assigned_ids(t["ids"], m) for t, m in zip(targets, matched)])
        tower = _tower_features(self.head.classification_head.conv, features)  # [B, P, C]
        losses = {}
        if with_losses:
            bbox_regression, bbox_ctrness = self.head.regression_head(features)
            matched_boxes = torch.cat([t["boxes"][m[m >= 0]] for t, m in zip(tv_targets, matched)])
            losses = self._weighted(
                self._box_losses(
                    bbox_regression[positive], bbox_ctrness[positive, 0], torch.stack(anchors)[positive], matched_boxes
                )
            )
        return AlignOutputs(features={"fcos": tower[positive]}, ids={"fcos": ids[positive]}, losses=losses)

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

    def align_drop_keys(self) -> list[str]:
        return [
            "head.classification_head.cls_logits",
            "head.regression_head.bbox_reg",
            "head.regression_head.bbox_ctrness",
        ]


# ---- RetinaNet --------------------------------------------------------------------------------------------------


class RetinaNetDetector(_TorchvisionDetectorMixin, RetinaNet):
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
    ) -> None:
        strides = _pyramid_strides(backbone, self.NUM_EXTRA_LEVELS)
        _check_levels("anchor_sizes", anchor_sizes, len(strides))
        if bbox_reg_loss not in BOX_LOSS_TYPES:
            raise UserError(f"model.detector.bbox_reg_loss: got {bbox_reg_loss!r}; expected one of {BOX_LOSS_TYPES}")
        sizes = [[float(base) * float(scale) for scale in anchor_scales] for base in anchor_sizes]
        anchors = FixedStrideAnchorGenerator(sizes, [list(aspect_ratios)] * len(strides), strides)
        num_anchors = anchors.num_anchors_per_location()[0]
        head = RetinaNetHead(
            fpn_channels, num_anchors, num_classes, norm_layer=_group_norm(fpn_channels, head_norm_groups)
        )
        # torchvision's own v2 builder selects the regression loss through this attribute.
        head.regression_head._loss_type = bbox_reg_loss
        super().__init__(
            backbone,
            num_classes,
            anchor_generator=anchors,
            head=head,
            score_thresh=score_thresh,
            nms_thresh=nms_thresh,
            detections_per_img=detections_per_img,
            fg_iou_thresh=fg_iou_thresh,
            bg_iou_thresh=bg_iou_thresh,
            topk_candidates=topk_candidates,
        )
        self.kind = "retinanet"
        self.label_offset = 0
        self.neck = _fpn(backbone, fpn_channels, LastLevelP6P7(fpn_channels, fpn_channels))
        self.transform = NoResizeTransform(pixel_mean, pixel_std, size_divisibility)
        self.loss_weights = _check_loss_weights(loss_weights, self.LOSS_NAMES)
        self.fpn_channels = fpn_channels
        self.num_anchors = num_anchors

    def match(self, anchors: list[Tensor], targets: list[dict[str, Tensor]]) -> list[Tensor]:
        """torchvision's RetinaNet matching: per image [num_anchors] int64, the box index for positives, -1 below
        bg_iou_thresh, -2 between the thresholds (ignored)."""
        matched = []
        for anchors_per_image, target in zip(anchors, targets):
            if target["boxes"].numel() == 0:
                matched.append(
                    torch.full((anchors_per_image.shape[0],), -1, dtype=torch.int64, device=anchors_per_image.device)
                )
            else:
                matched.append(self.proposal_matcher(box_iou(target["boxes"], anchors_per_image)))
        return matched

    def compute_loss(self, targets, head_outputs, anchors):
        return self.head.compute_loss(targets, head_outputs, anchors, self.match(anchors, targets))

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if self.training:
            self._require_targets(targets)
        image_list, tv_targets = self._prepare(images, targets if self.training else None)
        features = list(self.pyramid(image_list.tensors).values())
        head_outputs = self.head(features)
        anchors = self.anchor_generator(image_list, features)
        if self.training:
            return self._weighted(self.compute_loss(tv_targets, head_outputs, anchors))
        num_anchors_per_level = [f.shape[-2] * f.shape[-1] * self.num_anchors for f in features]
        split_outputs = {k: list(v.split(num_anchors_per_level, dim=1)) for k, v in head_outputs.items()}
        split_anchors = [list(a.split(num_anchors_per_level)) for a in anchors]
        return self.postprocess_detections(split_outputs, split_anchors, image_list.image_sizes)

    # ---- AlignDet ----

    def align_outputs(self, images: list[Tensor], targets: list[dict[str, Tensor]], with_losses: bool) -> AlignOutputs:
        """Branch "retinanet": the classification tower's output at each location holding an anchor that `match`
        makes positive, one row per (location, proposal id) pair: the reference gives each of the A anchors its
        own embedding from a per-anchor classifier, here the A anchors of a location share the tower feature the
        projector sees. Loss: the configured box regression loss on the positive anchors."""
        image_list, tv_targets = self._prepare(images, targets)
        features = list(self.pyramid(image_list.tensors).values())
        anchors = self.anchor_generator(image_list, features)
        matched_list = self.match(anchors, tv_targets)
        matched = torch.stack(matched_list)  # [B, L * A]
        ids = torch.stack([_assigned_ids(t["ids"], m) for t, m in zip(targets, matched)])
        tower = _tower_features(self.head.classification_head.conv, features)  # [B, L, C]
        num_locations = tower.shape[1]
        image_index, anchor_index = torch.nonzero(matched >= 0, as_tuple=True)
        location = image_index * num_locations + anchor_index // self.num_anchors
        # Sorted unique (location, id) pairs: still image-major, one row per location and proposal.
        pairs = torch.unique(torch.stack([location, ids[image_index, anchor_index]], dim=1), dim=0)
        losses = {}
        if with_losses:
            bbox_regression = self.head.regression_head(features)
            losses = self._weighted(
                {
                    "bbox_regression": self.head.regression_head.compute_loss(
                        tv_targets, {"bbox_regression": bbox_regression}, anchors, matched_list
                    )
                }
            )
        return AlignOutputs(
            features={"retinanet": tower.flatten(0, 1)[pairs[:, 0]]}, ids={"retinanet": pairs[:, 1]}, losses=losses
        )

    def align_feature_dims(self) -> dict[str, int]:
        return {"retinanet": self.fpn_channels}

    def align_drop_keys(self) -> list[str]:
        return ["head.classification_head.cls_logits", "head.regression_head.bbox_reg"]


# ---- Faster R-CNN -----------------------------------------------------------------------------------------------


class FasterRCNNDetector(_TorchvisionDetectorMixin, FasterRCNN):
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
    ) -> None:
        strides = _pyramid_strides(backbone, self.NUM_EXTRA_LEVELS)
        _check_levels("anchor_sizes", anchor_sizes, len(strides))
        anchors = FixedStrideAnchorGenerator([[s] for s in anchor_sizes], [list(aspect_ratios)] * len(strides), strides)
        level_names = [f"p{level}" for level in backbone.out_levels]
        super().__init__(
            backbone,
            num_classes=None,
            rpn_anchor_generator=anchors,
            rpn_head=RPNHead(fpn_channels, anchors.num_anchors_per_location()[0]),
            rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train,
            rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
            rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
            rpn_nms_thresh=rpn_nms_thresh,
            rpn_fg_iou_thresh=rpn_fg_iou_thresh,
            rpn_bg_iou_thresh=rpn_bg_iou_thresh,
            rpn_batch_size_per_image=rpn_batch_size_per_image,
            rpn_positive_fraction=rpn_positive_fraction,
            rpn_score_thresh=rpn_score_thresh,
            box_roi_pool=MultiScaleRoIAlign(level_names, roi_output_size, roi_sampling_ratio),
            box_head=TwoMLPHead(fpn_channels * roi_output_size**2, representation_size),
            box_predictor=FastRCNNPredictor(representation_size, num_classes + 1),
            box_score_thresh=box_score_thresh,
            box_nms_thresh=box_nms_thresh,
            box_detections_per_img=box_detections_per_img,
            box_fg_iou_thresh=box_fg_iou_thresh,
            box_bg_iou_thresh=box_bg_iou_thresh,
            box_batch_size_per_image=box_batch_size_per_image,
            box_positive_fraction=box_positive_fraction,
            bbox_reg_weights=tuple(float(w) for w in bbox_reg_weights),
        )
        self.kind = "faster_rcnn"
        self.label_offset = 1
        self.neck = _fpn(backbone, fpn_channels, LastLevelMaxPool())
        self.transform = NoResizeTransform(pixel_mean, pixel_std, size_divisibility)
        self.loss_weights = _check_loss_weights(loss_weights, self.LOSS_NAMES)
        self.representation_size = representation_size
        # Positives only (fraction 1, negatives marked ignored), as the reference's RoI sampler for pre-training.
        self.align_sampler = BalancedPositiveNegativeSampler(align_rois_per_image, 1.0)

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if self.training:
            self._require_targets(targets)
        image_list, tv_targets = self._prepare(images, targets if self.training else None)
        features = self.pyramid(image_list.tensors)
        proposals, rpn_losses = self.rpn(image_list, features, tv_targets)
        detections, roi_losses = self.roi_heads(features, proposals, image_list.image_sizes, tv_targets)
        if self.training:
            return self._weighted({**rpn_losses, **roi_losses})
        return [
            {"boxes": d["boxes"], "scores": d["scores"], "labels": d["labels"] - self.label_offset} for d in detections
        ]

    # ---- AlignDet ----

    def align_outputs(self, images: list[Tensor], targets: list[dict[str, Tensor]], with_losses: bool) -> AlignOutputs:
        """The RPN runs as in training against the proposals (its losses are part of `losses`; its proposal
        counts follow the module's mode). RoIs = the RPN's proposals plus the proposals themselves; those the RoI
        matcher makes positive (at most `align_rois_per_image` per image) give branch "rcnn": their TwoMLPHead
        features, ids = their matched proposal's id. Loss: the RoI box regression of those positives on the
        pseudo-class their proposal carries. with_losses needs training mode (the RPN computes losses only then).
        """
        if with_losses and not self.training:
            raise ValueError("FasterRCNNDetector.align_outputs: with_losses=True needs training mode")
        image_list, tv_targets = self._prepare(images, targets)
        features = self.pyramid(image_list.tensors)
        proposals, rpn_losses = self.rpn(image_list, features, tv_targets)
        gt_boxes = [t["boxes"].to(proposals[0].dtype) for t in tv_targets]
        rois = self.roi_heads.add_gt_proposals(proposals, gt_boxes)
        matched = [
            self.roi_heads.proposal_matcher(box_iou(boxes, r))
            if boxes.numel()
            else torch.full((r.shape[0],), -1, dtype=torch.int64, device=r.device)
            for boxes, r in zip(gt_boxes, rois)
        ]
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

    def align_drop_keys(self) -> list[str]:
        return ["roi_heads.box_predictor."]
