"""The auxiliary heads' assigners against a brute-force reference and hand-computed cases."""

from __future__ import annotations

import math
import random

import torch

from models.matching.assigners import BACKGROUND, IGNORE, ATSSAssigner, FCOSAssigner, MaxIoUAssigner


def _iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _centre(box: list[float]) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _brute_force_atss(anchors: list[list[float]], per_level: list[int], gts: list[list[float]], topk: int) -> list[int]:
    """ATSS written out box by box, candidate by candidate, in plain Python floats."""
    best = [(-1.0, BACKGROUND)] * len(anchors)
    for g, gt in enumerate(gts):
        gx, gy = _centre(gt)
        candidates, start = [], 0
        for count in per_level:
            level = range(start, start + count)
            by_distance = sorted(level, key=lambda i: math.dist(_centre(anchors[i]), (gx, gy)))
            candidates += by_distance[: min(topk, count)]
            start += count
        ious = [_iou(anchors[i], gt) for i in candidates]
        mean = sum(ious) / len(ious)
        std = math.sqrt(sum((v - mean) ** 2 for v in ious) / (len(ious) - 1))
        for i, v in zip(candidates, ious):
            cx, cy = _centre(anchors[i])
            inside = gt[0] < cx < gt[2] and gt[1] < cy < gt[3]
            if v >= mean + std and inside and v > best[i][0]:
                best[i] = (v, g)
    return [g for _, g in best]


def _hand_made_anchors() -> tuple[list[list[float]], list[int]]:
    """Two levels: stride 8 on a 10x10 grid with 32-px squares, stride 16 on a 5x5 grid with 64-px squares."""
    anchors, per_level = [], []
    for stride, cells, side in [(8, 10, 32.0), (16, 5, 64.0)]:
        for y in range(cells):
            for x in range(cells):
                cx, cy = x * stride + stride / 2, y * stride + stride / 2
                anchors.append([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2])
        per_level.append(cells * cells)
    return anchors, per_level


def test_atss_matches_brute_force_reference_on_random_boxes():
    anchors, per_level = _hand_made_anchors()
    rng = random.Random(0)
    assigner = ATSSAssigner(topk=9)
    total_positives = 0
    for _ in range(20):
        gts = []
        for _ in range(rng.randint(1, 4)):
            x1, y1 = rng.uniform(0, 60), rng.uniform(0, 60)
            gts.append([x1, y1, x1 + rng.uniform(6, 40), y1 + rng.uniform(6, 40)])
        expected = _brute_force_atss(anchors, per_level, gts, topk=9)
        got = assigner.assign(torch.tensor(anchors), per_level, torch.tensor(gts)).tolist()
        assert got == expected
        total_positives += sum(g >= 0 for g in got)
    assert total_positives > 20  # the comparison covered real positives, not only backgrounds


def test_atss_threshold_is_mean_plus_std_of_candidate_ious():
    # IoUs with the box are 1, 1/3 and 0: threshold 0.444 + 0.509 = 0.954, so only the first anchor passes.
    anchors = torch.tensor([[0.0, 0, 10, 10], [5, 0, 15, 10], [20, 0, 30, 10]])
    matched = ATSSAssigner(topk=3).assign(anchors, [3], torch.tensor([[0.0, 0, 10, 10]]))
    assert matched.tolist() == [0, BACKGROUND, BACKGROUND]


def test_atss_without_boxes_is_all_background():
    anchors, per_level = _hand_made_anchors()
    matched = ATSSAssigner(topk=9).assign(torch.tensor(anchors), per_level, torch.zeros(0, 4))
    assert (matched == BACKGROUND).all()


def test_max_iou_splits_positive_ignored_and_background_by_thresholds():
    gt = torch.tensor([[0.0, 0, 10, 10]])
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 5], [0, 0, 10, 2], [20, 20, 30, 30]])  # IoU 1, .5, .2, 0
    matched = MaxIoUAssigner(0.7, 0.3, 0.3, low_quality=None).assign(boxes, gt)
    assert matched.tolist() == [0, IGNORE, BACKGROUND, BACKGROUND]


def test_max_iou_low_quality_match_needs_min_pos_iou():
    gt = torch.tensor([[0.0, 0, 10, 10]])
    boxes = torch.tensor([[0.0, 0, 10, 5], [0, 0, 10, 2]])  # IoU .5 and .2, below pos_iou_thr .7
    assert MaxIoUAssigner(0.7, 0.3, 0.3, low_quality="mmdet").assign(boxes, gt).tolist() == [0, BACKGROUND]
    assert MaxIoUAssigner(0.7, 0.3, 0.6, low_quality="mmdet").assign(boxes, gt).tolist() == [IGNORE, BACKGROUND]


def test_max_iou_low_quality_claims_go_to_the_last_box():
    # The only prior is the best match of both boxes (IoU .8 and .75): the later box's claim wins (mmdet order).
    gts = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 6]])
    matched = MaxIoUAssigner(0.9, 0.3, 0.3, low_quality="mmdet").assign(torch.tensor([[0.0, 0, 10, 8]]), gts)
    assert matched.tolist() == [1]


def test_max_iou_without_boxes_is_all_background():
    matched = MaxIoUAssigner(0.5, 0.4, 0.0, "mmdet").assign(
        torch.rand(5, 2).repeat(1, 2) + torch.tensor([0, 0, 1, 1]), torch.zeros(0, 4)
    )
    assert (matched == BACKGROUND).all()


def test_fcos_takes_the_smallest_box_within_the_regress_range():
    gts = torch.tensor([[0.0, 0, 32, 32], [8, 8, 24, 24]])  # areas 1024 and 256
    points = torch.tensor([[16.0, 16], [4, 4], [100, 100], [16, 16]])
    strides = torch.tensor([8.0, 8, 8, 8])
    ranges = torch.tensor([[-1.0, 64], [-1, 64], [-1, 64], [64, 128]])  # the last point's level wants big boxes
    matched = FCOSAssigner(center_sampling=False, center_sample_radius=1.5).assign(points, strides, ranges, gts)
    assert matched.tolist() == [1, 0, BACKGROUND, BACKGROUND]


def test_fcos_centre_sampling_keeps_only_points_near_the_box_centre():
    gts = torch.tensor([[0.0, 0, 32, 32]])  # centre region with radius 1.5 x 8: [4, 4, 28, 28]
    points = torch.tensor([[2.0, 2], [6, 6], [16, 30]])
    strides = torch.tensor([8.0, 8, 8])
    ranges = torch.tensor([[-1.0, 64]] * 3)
    sampled = FCOSAssigner(center_sampling=True, center_sample_radius=1.5).assign(points, strides, ranges, gts)
    whole_box = FCOSAssigner(center_sampling=False, center_sample_radius=1.5).assign(points, strides, ranges, gts)
    assert sampled.tolist() == [BACKGROUND, 0, BACKGROUND]
    assert whole_box.tolist() == [0, 0, 0]
