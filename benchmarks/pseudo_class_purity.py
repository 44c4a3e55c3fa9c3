"""How far box_pretrain's pseudo-classes follow the objects: of the proposals that overlap a train object, the share
whose cluster's majority class is their object's class (purity), against always guessing the commonest class.

    python benchmarks/pseudo_class_purity.py --clusters D/proposals/pseudo-classes-*.json
        --proposals D/proposals/proposals-*.json --annotations D/synthetic/annotations/train.json [--iou 0.5]

The two caches are the ones box_pretrain logs (`summary.json`: proposals.cache_path, pseudo_classes.cache_path).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import torch
from torchvision.ops import box_iou


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clusters", required=True, help="a pseudo-classes cache (JSON)")
    parser.add_argument("--proposals", required=True, help="the proposals cache it was computed on (JSON)")
    parser.add_argument("--annotations", required=True, help="COCO annotations of the same images")
    parser.add_argument("--iou", type=float, default=0.5, help="a proposal is an object's at this IoU or above")
    args = parser.parse_args()
    with open(args.clusters) as f:
        clusters = json.load(f)
    with open(args.proposals) as f:
        proposals = json.load(f)
    with open(args.annotations) as f:
        annotations = json.load(f)

    objects: dict[int, list[tuple[list[float], int]]] = {}
    for ann in annotations["annotations"]:
        x, y, w, h = ann["bbox"]
        objects.setdefault(ann["image_id"], []).append(([x, y, x + w, y + h], ann["category_id"]))
    cluster_ids = dict(zip(clusters["image_ids"], clusters["labels"], strict=True))
    pairs: Counter[tuple[int, int]] = Counter()  # (cluster, object class) of each object proposal
    num_proposals = 0
    for image_id, boxes in zip(proposals["image_ids"], proposals["boxes"], strict=True):
        ids = cluster_ids.get(image_id, [])
        num_proposals += len(ids)
        truth = objects.get(image_id, [])
        if not ids or not truth:
            continue
        iou = box_iou(torch.tensor(boxes), torch.tensor([box for box, _ in truth]))
        best, index = iou.max(dim=1)
        for cluster, overlap, obj in zip(ids, best.tolist(), index.tolist(), strict=True):
            if overlap >= args.iou:
                pairs[(cluster, truth[obj][1])] += 1

    total = sum(pairs.values())
    majority: Counter[int] = Counter()
    for (cluster, _), count in pairs.items():
        majority[cluster] = max(majority[cluster], count)
    classes: Counter[int] = Counter()
    for (_, category), count in pairs.items():
        classes[category] += count
    print(f"proposals: {num_proposals}, overlapping an object at IoU >= {args.iou:g}: {total}")
    print(f"purity (cluster majority class): {100 * sum(majority.values()) / max(total, 1):.1f} %")
    print(f"commonest class alone: {100 * max(classes.values(), default=0) / max(total, 1):.1f} %")


if __name__ == "__main__":
    main()
