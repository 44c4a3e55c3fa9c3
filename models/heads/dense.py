"""The shared flow of the one-stage auxiliary heads (ATSS, RetinaNet, FCOS).

maps -> conv towers -> per-prior class logits / box regression / centre-ness -> per-image assignment by the
head's assigner -> weighted losses -> `AuxPositives`. A subclass supplies its priors, its assigner call and its
loss maths; everything else (flattening, padding masks, float32 regions, positives and negatives) lives here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from models.heads.base import AuxHead, AuxPositives
from models.heads.common import (
    PaddedTargets,
    centerness_target,
    float32_region,
    mean_over_processes,
    random_subset,
)
from models.matching.assigners import BACKGROUND, IGNORE
from models.matching.priors import DensePriors, StrideAnchorGenerator, StridePointGenerator, valid_location_mask


class DenseTower(nn.Module):
    """RetinaNet/ATSS/FCOS-style prediction towers shared by all levels.

    A classification and a regression branch, each `stacked_convs` x (3x3 conv without bias + GroupNorm + ReLU)
    (0 convs: the predictors read the input directly), then 3x3 predictors: `num_priors * num_classes` logits
    (bias initialised to the focal-loss prior -log((1 - p) / p)), `num_priors * 4` regression values multiplied
    by a learnable per-level scale, and, if `with_centerness`, `num_priors` centre-ness logits on the regression
    branch. Convolutions start from N(0, 0.01).
    forward(list of [B, C, H, W]) -> (cls maps, reg maps, centre-ness maps or None), one per level.
    """

    def __init__(
        self,
        in_channels: int,
        feat_channels: int,
        stacked_convs: int,
        num_groups: int,
        num_levels: int,
        num_priors: int,
        num_classes: int,
        with_centerness: bool,
        prior_prob: float,
    ):
        super().__init__()
        self.cls_convs = self._branch(in_channels, feat_channels, stacked_convs, num_groups)
        self.reg_convs = self._branch(in_channels, feat_channels, stacked_convs, num_groups)
        channels = feat_channels if stacked_convs > 0 else in_channels
        self.cls_pred = nn.Conv2d(channels, num_priors * num_classes, 3, padding=1)
        self.reg_pred = nn.Conv2d(channels, num_priors * 4, 3, padding=1)
        self.ctr_pred = nn.Conv2d(channels, num_priors, 3, padding=1) if with_centerness else None
        self.level_scales = nn.Parameter(torch.ones(num_levels))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.constant_(self.cls_pred.bias, -math.log((1 - prior_prob) / prior_prob))

    @staticmethod
    def _branch(in_channels: int, feat_channels: int, depth: int, num_groups: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [
                nn.Conv2d(in_channels if i == 0 else feat_channels, feat_channels, 3, padding=1, bias=False),
                nn.GroupNorm(num_groups, feat_channels),
                nn.ReLU(inplace=True),
            ]
        return nn.Sequential(*layers)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor] | None]:
        cls_maps, reg_maps, ctr_maps = [], [], []
        for level, x in enumerate(features):
            cls_feat, reg_feat = self.cls_convs(x), self.reg_convs(x)
            cls_maps.append(self.cls_pred(cls_feat))
            reg_maps.append(self.reg_pred(reg_feat) * self.level_scales[level])
            if self.ctr_pred is not None:
                ctr_maps.append(self.ctr_pred(reg_feat))
        return cls_maps, reg_maps, (ctr_maps if self.ctr_pred is not None else None)


def flatten_levels(maps: list[Tensor], num_priors: int) -> Tensor:
    """[B, A*K, H, W] per level -> [B, N, K] with N = sum(H*W*A), in the priors' order (level, y, x, prior)."""
    flat = []
    for m in maps:
        batch, channels, height, width = m.shape
        k = channels // num_priors
        flat.append(m.view(batch, num_priors, k, height, width).permute(0, 3, 4, 1, 2).reshape(batch, -1, k))
    return torch.cat(flat, dim=1)


class DenseAuxHead(AuxHead):
    """Base of the one-stage heads: builds the DenseTower for the subclass's prior generator and holds the
    focal-loss and loss-weight settings. Subclasses implement `assign_image` and `compute_losses`, and take the
    arguments below as `**dense_args` besides their own.

    Args (besides AuxHead's): `prior_generator` (given by the subclass); the tower's `feat_channels` (None: the
    input width), `stacked_convs`, `num_groups` (GroupNorm), `prior_prob` (the classifier's initial foreground
    probability); `focal_alpha`, `focal_gamma`; the loss weights `weight_cls`, `weight_bbox` and
    `weight_centerness` (None: no centre-ness branch, as RetinaNet).
    """

    def __init__(
        self,
        name: str,
        num_classes: int,
        in_channels: int,
        strides: list[int],
        max_negatives: int,
        align_drop_keys: Sequence[str],
        prior_generator: StrideAnchorGenerator | StridePointGenerator,
        feat_channels: int | None,
        stacked_convs: int,
        num_groups: int,
        prior_prob: float,
        focal_alpha: float,
        focal_gamma: float,
        weight_cls: float,
        weight_bbox: float,
        weight_centerness: float | None = None,
    ):
        super().__init__(name, num_classes, in_channels, strides, max_negatives, align_drop_keys)
        self.prior_generator = prior_generator
        self.tower = DenseTower(
            in_channels,
            feat_channels or in_channels,
            stacked_convs,
            num_groups,
            len(self.strides),
            prior_generator.num_per_location,
            num_classes,
            with_centerness=weight_centerness is not None,
            prior_prob=prior_prob,
        )
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.weight_cls = weight_cls
        self.weight_bbox = weight_bbox
        self.weight_centerness = weight_centerness

    def make_priors(self, feature_shapes: list[tuple[int, int]], device: torch.device) -> DensePriors:
        """The head's priors for maps of these (H, W) shapes."""
        return self.prior_generator(feature_shapes, device)

    def assign_image(self, priors: DensePriors, index: Tensor, gt_boxes: Tensor) -> Tensor:
        """matched [len(index)] (assigners' convention) for the priors `index` (ascending) of one image."""
        raise NotImplementedError(f"{type(self).__name__} must implement assign_image")

    def compute_losses(
        self,
        cls: Tensor,
        reg: Tensor,
        ctr: Tensor | None,
        priors: DensePriors,
        matched: Tensor,
        gt: PaddedTargets,
    ) -> dict[str, Tensor]:
        """Weighted losses from float32 predictions cls [B, N, C], reg [B, N, 4], ctr [B, N] and matched [B, N]."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute_losses")

    @staticmethod
    def positives(matched: Tensor, gt: PaddedTargets) -> tuple[Tensor, Tensor, Tensor]:
        """(image, prior) indices of the positive priors, and the box each was assigned [P, 4]."""
        image, prior = (matched >= 0).nonzero(as_tuple=True)
        return image, prior, gt.boxes[image, matched[image, prior]]

    def centerness_weighted_losses(
        self,
        loss_cls: Tensor,
        num_pos: Tensor,
        pred_boxes: Tensor,
        target_boxes: Tensor,
        centers: Tensor,
        ctr_logits: Tensor,
        min_ctr_norm: float,
    ) -> dict[str, Tensor]:
        """mmdet's ATSS / FCOS losses: `loss_cls` / positives; `loss_bbox` GIoU weighted by each positive's
        centre-ness target, / the sum of those targets (at least `min_ctr_norm`); `loss_centerness` BCE of the
        centre-ness logits, / positives; each times its `weight_*`."""
        ctr_target = centerness_target(centers, target_boxes)
        giou = generalized_box_iou_loss(pred_boxes, target_boxes, reduction="none")
        ctr_norm = mean_over_processes(ctr_target.sum()).clamp(min=min_ctr_norm)
        loss_ctr = F.binary_cross_entropy_with_logits(ctr_logits, ctr_target, reduction="sum")
        return {
            "loss_cls": self.weight_cls * loss_cls / num_pos,
            "loss_bbox": self.weight_bbox * (giou * ctr_target).sum() / ctr_norm,
            "loss_centerness": self.weight_centerness * loss_ctr / num_pos,
        }

    def classification_loss(self, cls: Tensor, matched: Tensor, gt: PaddedTargets) -> tuple[Tensor, Tensor]:
        """(summed sigmoid focal loss over the scored priors, positive count averaged over processes, >= 1).
        Positives and negatives are scored; ignored and padding priors are left out."""
        scored = matched >= BACKGROUND
        num_pos = mean_over_processes((matched >= 0).sum()).clamp(min=1.0)
        loss = sigmoid_focal_loss(
            cls[scored],
            one_hot_targets(cls, matched, gt)[scored],
            alpha=self.focal_alpha,
            gamma=self.focal_gamma,
            reduction="sum",
        )
        return loss, num_pos

    def forward(
        self,
        features: list[Tensor],
        strides: list[int],
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
    ) -> tuple[dict[str, Tensor], AuxPositives]:
        self.check_inputs(features, strides)
        device = features[0].device
        shapes = [(int(f.shape[-2]), int(f.shape[-1])) for f in features]
        cls_maps, reg_maps, ctr_maps = self.tower(features)
        priors = self.make_priors(shapes, device)
        num_priors = self.prior_generator.num_per_location
        with float32_region(device):
            cls = flatten_levels(cls_maps, num_priors).float()
            reg = flatten_levels(reg_maps, num_priors).float()
            ctr = flatten_levels(ctr_maps, num_priors).squeeze(-1).float() if ctr_maps is not None else None
            gt = PaddedTargets.from_targets(targets, device)
            valid = valid_location_mask(shapes, self.strides, image_sizes, device)[:, priors.locations]
            matched = self.assign(priors, valid, gt)
            losses = self.compute_losses(cls, reg, ctr, priors, matched, gt)
        return losses, self.collect_positives(features, priors, matched, gt)

    @torch.no_grad()
    def assign(self, priors: DensePriors, valid: Tensor, gt: PaddedTargets) -> Tensor:
        """matched [B, N]: each image's valid priors assigned by `assign_image`; padding priors are IGNORE."""
        matched = torch.full(valid.shape, IGNORE, dtype=torch.int64, device=valid.device)
        for image in range(valid.shape[0]):  # a loop over images; the assigners are vectorised over priors
            index = valid[image].nonzero().squeeze(1)
            matched[image, index] = self.assign_image(priors, index, gt.image_boxes(image))
        return matched

    def collect_positives(
        self, features: list[Tensor], priors: DensePriors, matched: Tensor, gt: PaddedTargets
    ) -> AuxPositives:
        cells = torch.cat([f.flatten(2) for f in features], dim=2).transpose(1, 2)  # [B, M, C]
        out = AuxPositives([], [], [], [], [], [], [])
        for image in range(matched.shape[0]):
            pos = (matched[image] >= 0).nonzero().squeeze(1)
            gt_index = matched[image, pos]
            neg = random_subset((matched[image] == BACKGROUND).nonzero().squeeze(1), self.max_negatives)
            out.boxes.append(priors.boxes[pos])
            out.labels.append(gt.labels[image, gt_index])
            out.target_boxes.append(gt.boxes[image, gt_index])
            out.gt_indices.append(gt_index)
            out.features.append(cells[image, priors.locations[pos]])
            out.negative_boxes.append(priors.boxes[neg])
            out.negative_features.append(cells[image, priors.locations[neg]])
        return out


def one_hot_targets(cls: Tensor, matched: Tensor, gt: PaddedTargets) -> Tensor:
    """[B, N, C] float: 1 at (positive prior, its box's class), 0 elsewhere (background is all zeros)."""
    target = torch.zeros_like(cls)
    image, prior = (matched >= 0).nonzero(as_tuple=True)
    target[image, prior, gt.labels[image, matched[image, prior]]] = 1.0
    return target
