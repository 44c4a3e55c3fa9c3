"""The label assigners of the auxiliary heads, as small stand-alone callables.

Every assigner answers the same question, "which ground-truth box, if any, does each prior belong to?", and
returns `matched [A]` int64 with:
- `>= 0`: the index of the assigned box in `gt_boxes` (a positive);
- `BACKGROUND` (-1): a negative;
- `IGNORE` (-2): neither (only MaxIoUAssigner produces it, between its thresholds).
They look at boxes only, never at classes, so AlignDet's box-domain pre-training can reuse them with proposal
ids as labels. With no ground-truth box every prior is BACKGROUND. All maths is vectorised over priors x boxes.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou

BACKGROUND = -1
IGNORE = -2


class MaxIoUAssigner:
    """Max-IoU assignment (Faster R-CNN's RPN and RoI head, RetinaNet), mmdet semantics.

    For each prior, with `iou` its best IoU over the boxes:
    - `iou < neg_iou_thr` -> BACKGROUND; `iou >= pos_iou_thr` -> that best box; otherwise IGNORE;
    - if `match_low_quality`, every box then also claims the priors with which it has its own highest IoU
      (all ties), provided that IoU is >= `min_pos_iou` and > 0; when several boxes claim one prior, the box
      with the largest index wins (mmdet's loop order).
    assign(boxes [A, 4], gt_boxes [G, 4]) -> matched [A].
    """

    def __init__(self, pos_iou_thr: float, neg_iou_thr: float, min_pos_iou: float, match_low_quality: bool):
        if neg_iou_thr > pos_iou_thr:
            raise ValueError(f"MaxIoUAssigner: neg_iou_thr {neg_iou_thr} > pos_iou_thr {pos_iou_thr}")
        self.pos_iou_thr = pos_iou_thr
        self.neg_iou_thr = neg_iou_thr
        self.min_pos_iou = min_pos_iou
        self.match_low_quality = match_low_quality

    def assign(self, boxes: Tensor, gt_boxes: Tensor) -> Tensor:
        num_boxes = boxes.shape[0]
        matched = torch.full((num_boxes,), IGNORE, dtype=torch.int64, device=boxes.device)
        if gt_boxes.shape[0] == 0 or num_boxes == 0:
            return matched.fill_(BACKGROUND)
        iou = box_iou(gt_boxes.float(), boxes.float())  # [G, A]
        best_iou, best_gt = iou.max(dim=0)
        matched[best_iou < self.neg_iou_thr] = BACKGROUND
        positive = best_iou >= self.pos_iou_thr
        matched[positive] = best_gt[positive]
        if self.match_low_quality:
            gt_best = iou.max(dim=1).values  # [G]
            eligible = (gt_best >= self.min_pos_iou) & (gt_best > 0)
            claims = (iou == gt_best[:, None]) & eligible[:, None]  # [G, A]
            # 1-based index of the last claiming box per prior, 0 when none claims it.
            order = torch.arange(1, gt_boxes.shape[0] + 1, device=boxes.device)[:, None]
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
    """FCOS point assignment with centre sampling (Tian et al., ICCV 2019; mmdet's FCOSHead targets).

    assign(points [A, 2], strides [A], regress_ranges [A, 2], gt_boxes [G, 4]) -> matched [A]. A point may take a
    box when both hold:
    - it lies strictly inside the box, or, with `center_sampling`, strictly inside the box's centre region
      (the box centre +- `center_sample_radius` x the point's stride, clipped to the box);
    - the largest of its distances (l, t, r, b) to the box edges lies in its level's [low, high] regress range.
    Among the boxes it may take, it takes the one of smallest area; points with none are BACKGROUND.
    """

    def __init__(self, center_sampling: bool, center_sample_radius: float):
        self.center_sampling = center_sampling
        self.center_sample_radius = center_sample_radius

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

        if self.center_sampling:
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
            inside = (
                torch.stack(
                    [xs - region[..., 0], ys - region[..., 1], region[..., 2] - xs, region[..., 3] - ys], dim=-1
                ).amin(dim=-1)
                > 0
            )
        else:
            inside = distances.amin(dim=-1) > 0

        largest = distances.amax(dim=-1)  # [A, G]
        ranges = regress_ranges.float()
        in_range = (largest >= ranges[:, 0:1]) & (largest <= ranges[:, 1:2])

        areas = ((gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])).expand(num_points, num_gt)
        areas = torch.where(inside & in_range, areas, torch.full_like(areas, float("inf")))
        smallest, smallest_gt = areas.min(dim=1)
        is_positive = torch.isfinite(smallest)
        matched[is_positive] = smallest_gt[is_positive]
        return matched
