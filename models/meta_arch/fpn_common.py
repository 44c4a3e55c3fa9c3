"""What the three FPN detectors built on torchvision (FCOS, RetinaNet, Faster R-CNN) share.

Each detector keeps torchvision's heads, losses and postprocessing. What changes, here and in each file:
- `backbone` is our ResNetBackbone (state-dict keys `backbone.body.*`, so image_pretrain checkpoints load) and
  `neck` is torchvision's FeaturePyramidNetwork (P6/P7 convolutions for FCOS and RetinaNet, a max-pooled P6
  for Faster R-CNN);
- images are normalised and padded but never resized (our datasets resize), so boxes in and out are in the
  input image's pixels;
- anchors and points come from the package's prior generator (models/matching/priors.py), placed with each
  level's true stride, and the assignment from its assigners (models/matching/assigners.py) in torchvision's
  convention;
- labels are contiguous 0..C-1 in and out (Faster R-CNN keeps 0 for background inside: +1 in, -1 out);
- losses are weighted and keyed `<kind>/loss_<torchvision name>`;
- `align_outputs` / `align_feature_dims` / `align_drop_keys` serve AlignDet box-domain pre-training
  (models/pretrain/align_outputs.py): the detector's own assigner matches predictions to proposals, the features
  are those its classifier would see, and the losses are its box-regression losses against the proposals.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor, nn

from models.errors import ModelConfigError
from models.layers.backbone import ResNetBackbone
from models.layers.tv_detection import (
    ExtraFPNBlock,
    FeaturePyramidNetwork,
    GeneralizedRCNNTransform,
    ImageList,
    LastLevelP6P7,
)
from models.pretrain.align_outputs import DEFAULT_ALIGN_OPTIONS, AlignOptions


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


def fpn(backbone: ResNetBackbone, channels: int, extra: ExtraFPNBlock) -> FeaturePyramidNetwork:
    return FeaturePyramidNetwork(list(backbone.out_channels), channels, extra_blocks=extra)


def check_levels(argument: str, values: Sequence, num_levels: int) -> None:
    if len(values) != num_levels:
        raise ModelConfigError(argument, f"got {len(values)} entries; expected one per pyramid level ({num_levels})")


def group_norm(fpn_channels: int, groups: int | None) -> Callable[[int], nn.Module] | None:
    """GroupNorm(groups) for the head towers, or None (no normalisation).

    Each group needs at least two channels: the coarsest level of a small image is a 1x1 map, and GroupNorm
    refuses a group holding a single value (e.g. one image at eval time).
    """
    if groups is None:
        return None
    if fpn_channels % groups != 0 or fpn_channels < 2 * groups:
        raise ModelConfigError(
            "head_norm_groups",
            f"{groups} with fpn_channels {fpn_channels}; expected a divisor of fpn_channels leaving at least 2 "
            "channels per group (or null for no normalisation)",
        )
    return partial(nn.GroupNorm, groups)


def check_loss_weights(loss_weights: Mapping[str, float], names: Sequence[str]) -> dict[str, float]:
    weights = {str(k): float(v) for k, v in loss_weights.items()}
    if set(weights) != set(names):
        raise ModelConfigError("loss_weights", f"got {sorted(weights)}; expected exactly {sorted(names)}")
    if any(w < 0 for w in weights.values()):
        raise ModelConfigError("loss_weights", f"got {weights}; expected weights >= 0")
    return weights


class FPNDetectorMixin:
    """Preprocessing, features and loss naming shared by the three detectors (which set `kind`, `backbone`,
    `neck`, `transform`, `loss_weights`, `label_offset` and `transfer_drop_keys`)."""

    kind: str
    label_offset: int
    transfer_drop_keys: list[str]

    def align_drop_keys(self, options: AlignOptions = DEFAULT_ALIGN_OPTIONS) -> list[str]:
        """State-dict key patterns (`stages.engine.checkpoint.drop_matches`) a box-pretrained checkpoint leaves out
        of fine-tuning: the model config's `align_drop_keys` (classifiers and last box-regression layers)."""
        return list(self.transfer_drop_keys)

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

    def max_detections(self) -> int:
        """Detections kept per image at inference (torchvision's `detections_per_img`)."""
        roi_heads = getattr(self, "roi_heads", None)
        return int(roi_heads.detections_per_img if roi_heads is not None else self.detections_per_img)

    def predict_batch(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Inference on a batch of equally sized images: images [N, 3, H, W] in [0, 1] -> (scores [N, D], labels
        int64 [N, D], boxes [N, D, 4] xyxy pixels), D = `max_detections()`. After NMS an image keeps up to D
        detections; the rest of its row is padding with score 0 (so a score threshold drops it)."""
        count = self.max_detections()
        rows = [padded_row(output, count) for output in self.forward(list(images.unbind(0)))]
        return tuple(torch.stack(parts) for parts in zip(*rows))

    def _forward_inputs(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None
    ) -> tuple[ImageList, list[dict[str, Tensor]] | None]:
        """`_prepare` for `forward`: targets are required in training and left out in eval."""
        if self.training and targets is None:
            raise ValueError(f"{type(self).__name__}: training mode needs targets")
        return self._prepare(images, targets if self.training else None)


def padded_row(output: dict[str, Tensor], count: int) -> tuple[Tensor, Tensor, Tensor]:
    """One image's variable-length detections as exactly `count` rows, padded with zeros. Concatenate, then
    slice: every shape stays static, which ONNX export needs."""
    scores = torch.cat([output["scores"], output["scores"].new_zeros(count)])[:count]
    labels = torch.cat([output["labels"], output["labels"].new_zeros(count)])[:count]
    boxes = torch.cat([output["boxes"], output["boxes"].new_zeros(count, 4)])[:count]
    return scores, labels, boxes


class DenseAlignBatch(NamedTuple):
    """A view through a dense detector up to its assignment: torchvision targets, pyramid maps, priors per image,
    matched per image (the assigners' convention), the proposal id of each prior ([B, P], -1 where unmatched)
    and the classification tower's output at every location ([B, L, C])."""

    tv_targets: list[dict[str, Tensor]]
    features: list[Tensor]
    anchors: list[Tensor]
    matched: list[Tensor]
    ids: Tensor
    tower: Tensor


class DenseFPNDetectorMixin(FPNDetectorMixin):
    """FCOS and RetinaNet: one head on every pyramid level (P3-P7), priors from `anchor_generator`, assignment by
    `match(anchors, targets, num_anchors_per_level)`, torchvision's losses and postprocessing."""

    LOSS_NAMES: tuple[str, ...]

    def _add_pyramid_and_transform(
        self,
        kind: str,
        backbone: ResNetBackbone,
        fpn_channels: int,
        loss_weights: Mapping[str, float],
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        size_divisibility: int,
    ) -> None:
        """What both set after torchvision's constructor: the FPN with P6/P7 made from P5, our transform, the
        loss weights (labels stay 0..C-1: no background class)."""
        self.kind = kind
        self.label_offset = 0
        self.neck = fpn(backbone, fpn_channels, LastLevelP6P7(fpn_channels, fpn_channels))
        self.transform = NoResizeTransform(pixel_mean, pixel_std, size_divisibility)
        self.loss_weights = check_loss_weights(loss_weights, self.LOSS_NAMES)
        self.fpn_channels = fpn_channels

    def num_anchors_per_level(self, features: list[Tensor]) -> list[int]:
        per_location = self.anchor_generator.num_anchors_per_location()[0]
        return [f.shape[-2] * f.shape[-1] * per_location for f in features]

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        image_list, tv_targets = self._forward_inputs(images, targets)
        features = list(self.pyramid(image_list.tensors).values())
        head_outputs = self.head(features)
        anchors = self.anchor_generator(image_list, features)
        num_anchors_per_level = self.num_anchors_per_level(features)
        if self.training:
            return self._weighted(self.compute_loss(tv_targets, head_outputs, anchors, num_anchors_per_level))
        split_outputs = {k: list(v.split(num_anchors_per_level, dim=1)) for k, v in head_outputs.items()}
        split_anchors = [list(a.split(num_anchors_per_level)) for a in anchors]
        # Nothing was resized, so torchvision's clipped boxes are already in the input image's pixels.
        return self.postprocess_detections(split_outputs, split_anchors, image_list.image_sizes)

    def align_batch(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> DenseAlignBatch:
        """The common start of `align_outputs`: the view's priors, their proposals and the tower features."""
        image_list, tv_targets = self._prepare(images, targets)
        features = list(self.pyramid(image_list.tensors).values())
        anchors = self.anchor_generator(image_list, features)
        matched = self.match(anchors, tv_targets, self.num_anchors_per_level(features))
        ids = torch.stack([assigned_ids(t["ids"], m) for t, m in zip(targets, matched)])
        tower = tower_features(self.head.classification_head.conv, features)
        return DenseAlignBatch(tv_targets, features, anchors, matched, ids, tower)


def assigned_ids(ids: Tensor, matched: Tensor) -> Tensor:
    """The proposal id of each matched prediction: `ids[matched]` where matched >= 0, -1 elsewhere."""
    out = torch.full_like(matched, -1)
    positive = matched >= 0
    out[positive] = ids.to(matched.device)[matched[positive]]
    return out


def tower_features(tower: nn.Module, features: list[Tensor]) -> Tensor:
    """A head tower on every level, flattened like torchvision's head outputs: [B, sum_l H_l W_l, C]."""
    return torch.cat([tower(f).flatten(2) for f in features], dim=2).transpose(1, 2)
