"""COCO box metrics: predictions in the file's own category ids, AP in percent.

Two backends compute the same COCOeval protocol: `pycocotools` (the reference, the default) and
`faster_coco_eval` (the `faster-coco-eval` package, a C++ reimplementation; benchmarks/coco_eval_backends.py
compares their numbers and speed)."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from stages.errors import UserError

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def to_coco_results(
    image_id: int, output: dict[str, torch.Tensor], scale_xy: tuple[float, float], label_to_cat_id: list[int]
) -> list[dict]:
    """One image's detections as COCO result dicts; boxes scaled from model-input pixels to the file's pixels."""
    boxes = output["boxes"].detach().float().cpu().clone()
    boxes[:, 0::2] *= scale_xy[0]
    boxes[:, 1::2] *= scale_xy[1]
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = output["scores"].detach().float().cpu().tolist()
    labels = output["labels"].detach().cpu().tolist()
    return [
        {
            "image_id": int(image_id),
            "category_id": int(label_to_cat_id[lab]),
            "bbox": [round(v, 2) for v in box],
            "score": round(score, 5),
        }
        for box, score, lab in zip(xywh, scores, labels, strict=True)
    ]


BACKENDS = ("pycocotools", "faster_coco_eval")


def _evaluator(gt: COCO, results: list[dict], backend: str):
    """A COCOeval over `gt` and `results` from `backend`, not yet run."""
    if backend == "pycocotools":
        return COCOeval(gt, gt.loadRes(results), iouType="bbox")
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO as FasterCOCO
        from faster_coco_eval import COCOeval_faster

        faster_gt = FasterCOCO()
        faster_gt.dataset = gt.dataset
        faster_gt.createIndex()
        return COCOeval_faster(faster_gt, faster_gt.loadRes(results), iouType="bbox")
    raise UserError(f"stage.backend: unknown COCO evaluation backend {backend!r}; expected one of {BACKENDS}")


def evaluate_coco(
    gt: COCO,
    results: list[dict],
    image_ids: list[int],
    class_names: list[str],
    cat_ids: list[int],
    backend: str = "pycocotools",
) -> dict:
    """{"AP", "AP50", "AP75", "APs", "APm", "APl", "per_class": {name: AP}} in percent over `image_ids`."""
    if backend not in BACKENDS:
        raise UserError(f"stage.backend: unknown COCO evaluation backend {backend!r}; expected one of {BACKENDS}")
    if not results:
        return {**{k: 0.0 for k in METRIC_NAMES}, "per_class": {name: 0.0 for name in class_names}}
    # Both backends print their progress; keep the console for our own table.
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = _evaluator(gt, results, backend)
        coco_eval.params.imgIds = list(image_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    stats = coco_eval.stats
    metrics = {name: float(max(stats[i], 0.0)) * 100 for i, name in enumerate(METRIC_NAMES)}
    # precision: [iou thresholds, recall points, categories, area ranges, max dets]; area "all", 100 dets.
    precision = coco_eval.eval["precision"]
    eval_cat_ids = list(coco_eval.params.catIds)
    per_class = {}
    for name, cat_id in zip(class_names, cat_ids, strict=True):
        p = precision[:, :, eval_cat_ids.index(cat_id), 0, -1]
        p = p[p > -1]
        per_class[name] = float(np.mean(p)) * 100 if p.size else 0.0
    metrics["per_class"] = per_class
    return metrics


def format_table(metrics: dict) -> str:
    head = " | ".join(f"{k:>6}" for k in METRIC_NAMES)
    row = " | ".join(f"{metrics[k]:6.2f}" for k in METRIC_NAMES)
    lines = [head, row, "", f"{'class':<20}{'AP':>8}"]
    lines += [f"{name:<20}{ap:8.2f}" for name, ap in metrics["per_class"].items()]
    return "\n".join(lines)
