"""The one set of label assigners, used by the Co-DETR auxiliary heads and the standalone detectors alike.

Every assigner answers the same question, "which ground-truth box, if any, does each prior belong to?", and
returns `matched [A]` int64 with:
- `>= 0`: the index of the assigned box in `gt_boxes` (a positive);
- `BACKGROUND` (-1): a negative;
- `IGNORE` (-2): neither (only MaxIoUAssigner produces it, between its thresholds).
They look at boxes only, never at classes, so AlignDet's box-domain pre-training can reuse them with proposal
ids as labels. With no ground-truth box every prior is BACKGROUND. All maths is vectorised over priors x boxes.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torchvision.ops import box_iou

BACKGROUND = -1
IGNORE = -2
# The two reference implementations the detectors follow: mmdet (Co-DETR's auxiliary heads) and torchvision
# (the standalone FCOS, RetinaNet and Faster R-CNN). Where they disagree, an assigner takes the convention.
Convention = Literal["mmdet", "torchvision"]


class MaxIoUAssigner:
    """Max-IoU assignment (RPNs, RoI heads, RetinaNet).

    For each prior, with `iou` its best IoU over the boxes:
    - `iou < neg_iou_thr` -> BACKGROUND; `iou >= pos_iou_thr` -> that best box; otherwise IGNORE;
    - `low_quality` then gives each box the priors with which it has its own highest IoU (all ties), in one of
      two ways:
      - "mmdet": provided that IoU is >= `min_pos_iou` and > 0, the prior goes to that box; when several
        boxes claim one prior, the box with the largest index wins (mmdet's loop order);
      - "torchvision": the prior goes to its own best box, whatever the IoU (torchvision's Matcher);
      - None: no low-quality matches.
    assign(boxes [A, 4], gt_boxes [G, 4]) -> matched [A]; called on an IoU matrix [G, A] it is a drop-in for
    torchvision's Matcher (whose BELOW_LOW_THRESHOLD / BETWEEN_THRESHOLDS it names), which the torchvision
    RPN and RoI heads call.
    """

    BELOW_LOW_THRESHOLD = BACKGROUND
    BETWEEN_THRESHOLDS = IGNORE

    def __init__(
        self, pos_iou_thr: float, neg_iou_thr: float, min_pos_iou: float = 0.0, low_quality: Convention | None = None
    ) -> None:
        if neg_iou_thr > pos_iou_thr:
            raise ValueError(f"MaxIoUAssigner: neg_iou_thr {neg_iou_thr} > pos_iou_thr {pos_iou_thr}")
        if low_quality not in ("mmdet", "torchvision", None):
            raise ValueError(f"MaxIoUAssigner: low_quality {low_quality!r}; expected 'mmdet', 'torchvision' or None")
        self.pos_iou_thr = pos_iou_thr
        self.neg_iou_thr = neg_iou_thr
        self.min_pos_iou = min_pos_iou
        self.low_quality = low_quality

    def assign(self, boxes: Tensor, gt_boxes: Tensor) -> Tensor:
        if gt_boxes.shape[0] == 0 or boxes.shape[0] == 0:
            return torch.full((boxes.shape[0],), BACKGROUND, dtype=torch.int64, device=boxes.device)
        return self(box_iou(gt_boxes.float(), boxes.float()))

    def __call__(self, iou: Tensor) -> Tensor:
        """matched [A] from the IoU matrix [G, A] (G, A > 0) of the boxes with the priors."""
        matched = torch.full((iou.shape[1],), IGNORE, dtype=torch.int64, device=iou.device)
        best_iou, best_gt = iou.max(dim=0)
        matched[best_iou < self.neg_iou_thr] = BACKGROUND
        positive = best_iou >= self.pos_iou_thr
        matched[positive] = best_gt[positive]
        if self.low_quality is None:
            return matched
        gt_best = iou.max(dim=1).values  # [G]
        if self.low_quality == "torchvision":
            _, claimed = torch.where(iou == gt_best[:, None])
            matched[claimed] = best_gt[claimed]
            return matched
        eligible = (gt_best >= self.min_pos_iou) & (gt_best > 0)
        claims = (iou == gt_best[:, None]) & eligible[:, None]  # [G, A]
        # 1-based index of the last claiming box per prior, 0 when none claims it.
        order = torch.arange(1, iou.shape[0] + 1, device=iou.device)[:, None]
        last_claim = (claims * order).max(dim=0).values
        claimed = last_claim > 0
        matched[claimed] = last_claim[claimed] - 1
        return matched


class ATSSAssigner:
    """Adaptive Training Sample Selection (Zhang et al., CVPR 2020), as in mmdet's ATSSAssigner.

    assign(anchors [A, 4], num_anchors_per_level list[int] (anchors are grouped by level in that order),
    gt_boxes [G, 4]) -> matched [A], for each box:
    1. on every level, the `topk` anchors (all of them if the level has fewer) whose centres are closest (L2) to
       the box centre are its candidates;
    2. its IoU threshold is mean + std (unbiased; 0 when there is a single candidate) of the candidates' IoUs;
    3. a candidate is positive if its IoU >= the threshold and its centre lies strictly inside the box.
    An anchor that is positive for several boxes goes to the one it has the highest IoU with; all other anchors
    are BACKGROUND (ATSS has no ignore band).
    """

    def __init__(self, topk: int):
        self.topk = topk

    def assign(self, anchors: Tensor, num_anchors_per_level: list[int], gt_boxes: Tensor) -> Tensor:
        num_anchors, num_gt = anchors.shape[0], gt_boxes.shape[0]
        if sum(num_anchors_per_level) != num_anchors:
            raise ValueError(f"ATSSAssigner: levels hold {sum(num_anchors_per_level)} anchors; got {num_anchors}")
        matched = torch.full((num_anchors,), BACKGROUND, dtype=torch.int64, device=anchors.device)
        if num_gt == 0 or num_anchors == 0:
            return matched
        anchors, gt_boxes = anchors.float(), gt_boxes.float()
        iou = box_iou(anchors, gt_boxes)  # [A, G]
        anchor_centres = (anchors[:, :2] + anchors[:, 2:]) / 2
        gt_centres = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
        # Exact differences rather than cdist's matrix-product shortcut, so near-ties rank as in mmdet.
        distances = (anchor_centres[:, None, :] - gt_centres[None, :, :]).pow(2).sum(-1).sqrt()  # [A, G]

        candidates = []  # per level [k_l, G] anchor indices; a loop over levels, not anchors
        start = 0
        for count in num_anchors_per_level:
            k = min(self.topk, count)
            if k > 0:
                nearest = distances[start : start + count].topk(k, dim=0, largest=False).indices
                candidates.append(nearest + start)
            start += count
        candidates = torch.cat(candidates, dim=0)  # [K, G]
        gt_columns = torch.arange(num_gt, device=anchors.device).expand_as(candidates)
        candidate_iou = iou[candidates, gt_columns]
        spread = candidate_iou.std(dim=0) if candidates.shape[0] > 1 else torch.zeros_like(candidate_iou[0])
        threshold = candidate_iou.mean(dim=0) + spread

        centres = anchor_centres[candidates]  # [K, G, 2]
        inside = (
            (centres[..., 0] > gt_boxes[:, 0])
            & (centres[..., 1] > gt_boxes[:, 1])
            & (centres[..., 0] < gt_boxes[:, 2])
            & (centres[..., 1] < gt_boxes[:, 3])
        )
        positive = (candidate_iou >= threshold) & inside

        # IoU of each (anchor, box) pair that is positive, -1 elsewhere; then each anchor takes its best box.
        positive_iou = torch.full_like(iou, -1.0)
        positive_iou[candidates[positive], gt_columns[positive]] = candidate_iou[positive]
        best_iou, best_gt = positive_iou.max(dim=1)
        is_positive = best_iou >= 0
        matched[is_positive] = best_gt[is_positive]
        return matched


class FCOSAssigner:
    """FCOS point assignment with centre sampling (Tian et al., ICCV 2019).

    assign(points [A, 2], strides [A], regress_ranges [A, 2], gt_boxes [G, 4]) -> matched [A]. A point may take a
    box when both hold:
    - it lies strictly inside the box, and, with `center_sampling`, strictly within `center_sample_radius` x its
      stride of the box centre (in x and in y);
    - the largest of its distances (l, t, r, b) to the box edges lies in its [low, high] regress range.
    Among the boxes it may take, it takes the one of smallest area; points with none are BACKGROUND.

    `convention` "mmdet" (FCOSHead targets) and "torchvision" (FCOS.compute_loss) describe the same region but
    differ at its edges: mmdet's ranges are closed and its centre test clips the centre square to the box first;
    torchvision's ranges are open and it tests the distance to the centre and the box separately (a point on a
    rounding boundary can fall either way). Each detector keeps its reference's.
    """

    def __init__(self, center_sampling: bool, center_sample_radius: float, convention: Convention = "mmdet") -> None:
        if convention not in ("mmdet", "torchvision"):
            raise ValueError(f"FCOSAssigner: convention {convention!r}; expected 'mmdet' or 'torchvision'")
        self.center_sampling = center_sampling
        self.center_sample_radius = center_sample_radius
        self.convention = convention

    def assign(self, points: Tensor, strides: Tensor, regress_ranges: Tensor, gt_boxes: Tensor) -> Tensor:
        num_points, num_gt = points.shape[0], gt_boxes.shape[0]
        matched = torch.full((num_points,), BACKGROUND, dtype=torch.int64, device=points.device)
        if num_gt == 0 or num_points == 0:
            return matched
        points, gt_boxes = points.float(), gt_boxes.float()
        xs, ys = points[:, 0:1], points[:, 1:2]  # [A, 1]
        distances = torch.stack(
            [xs - gt_boxes[:, 0], ys - gt_boxes[:, 1], gt_boxes[:, 2] - xs, gt_boxes[:, 3] - ys], dim=-1
        )  # [A, G, 4] as (l, t, r, b)
        largest = distances.amax(dim=-1)  # [A, G]
        ranges = regress_ranges.float()
        if self.convention == "mmdet":
            inside = self._inside_clipped_centre_region(xs, ys, strides, gt_boxes, distances)
            in_range = (largest >= ranges[:, 0:1]) & (largest <= ranges[:, 1:2])
        else:
            inside = distances.amin(dim=-1) > 0
            if self.center_sampling:
                radius = strides.float()[:, None] * self.center_sample_radius  # [A, 1]
                centres = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
                inside &= (points[:, None] - centres[None]).abs().amax(dim=2) < radius
            in_range = (largest > ranges[:, 0:1]) & (largest < ranges[:, 1:2])

        areas = ((gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])).expand(num_points, num_gt)
        areas = torch.where(inside & in_range, areas, torch.full_like(areas, float("inf")))
        smallest, smallest_gt = areas.min(dim=1)
        is_positive = torch.isfinite(smallest)
        matched[is_positive] = smallest_gt[is_positive]
        return matched

    def _inside_clipped_centre_region(
        self, xs: Tensor, ys: Tensor, strides: Tensor, gt_boxes: Tensor, distances: Tensor
    ) -> Tensor:
        """[A, G]: strictly inside the box, or (centre sampling) inside its centre square clipped to the box."""
        if not self.center_sampling:
            return distances.amin(dim=-1) > 0
        radius = strides.float()[:, None] * self.center_sample_radius  # [A, 1]
        centre_x = (gt_boxes[:, 0] + gt_boxes[:, 2]) / 2
        centre_y = (gt_boxes[:, 1] + gt_boxes[:, 3]) / 2
        region = torch.stack(
            [
                torch.maximum(centre_x - radius, gt_boxes[:, 0]),
                torch.maximum(centre_y - radius, gt_boxes[:, 1]),
                torch.minimum(centre_x + radius, gt_boxes[:, 2]),
                torch.minimum(centre_y + radius, gt_boxes[:, 3]),
            ],
            dim=-1,
        )  # [A, G, 4]
        return (
            torch.stack(
                [xs - region[..., 0], ys - region[..., 1], region[..., 2] - xs, region[..., 3] - ys], dim=-1
            ).amin(dim=-1)
            > 0
        )
