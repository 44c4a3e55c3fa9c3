"""Random COCO-format ground truth with noisy detections, for checking and timing the COCO evaluators."""

from __future__ import annotations

import numpy as np

from stages.data.coco import validate_coco


def crowded_coco(seed: int = 0, num_images: int = 30) -> tuple[dict, list[dict]]:
    """Ground truth with sparse category ids, crowd boxes and images without annotations, and noisy detections
    (missed objects, false positives, jittered boxes) of all three sizes."""
    rng = np.random.default_rng(seed)
    categories = [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}, {"id": 11, "name": "c"}]
    images, annotations, results = [], [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": 640, "height": 480})
        if image_id % 5 == 0:
            continue  # no annotation at all
        for _ in range(rng.integers(1, 6)):
            w, h = rng.uniform(8, 300, size=2)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            cat = int(rng.choice([3, 7, 11]))
            crowd = int(rng.random() < 0.1)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cat,
                    "bbox": [x, y, w, h],
                    "iscrowd": crowd,
                }
            )
            if rng.random() < 0.8:
                jitter = rng.normal(0, 0.1, size=4) * [w, h, w, h]
                box = [float(v) for v in np.array([x, y, w, h]) + jitter]
                results.append({"image_id": image_id, "category_id": cat, "bbox": box, "score": float(rng.random())})
        for _ in range(rng.integers(0, 3)):
            box = [float(v) for v in rng.uniform(0, 200, size=4)]
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(rng.choice([3, 7, 11])),
                    "bbox": box,
                    "score": float(rng.random()),
                }
            )
    dataset = {"images": images, "annotations": annotations, "categories": categories}
    validate_coco(dataset, "synthetic.json")
    return dataset, results
