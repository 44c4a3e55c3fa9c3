"""The two COCO evaluation backends (pycocotools, faster-coco-eval): the same AP, and how long each takes.

    python benchmarks/coco_eval_backends.py [--run-dir RUN] [--images 5000] [--repeats 3]

1. With `--run-dir` (a run whose eval stage finished): its eval/predictions.json against the val annotations of the
   run's config (the synthetic val split for the default run), scored by both backends; AP to two decimals.
2. A generated COCO-format set of `--images` images (640x480, three sparse category ids, 1-5 objects per image,
   every fifth image empty, 10% crowd boxes) with noisy detections (jittered, missed, false positives): AP of
   both and the median seconds of `--repeats` evaluations each (index + evaluate + accumulate + summarize).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from omegaconf import OmegaConf

from stages.data.coco import make_coco, read_json, validate_coco
from stages.data.random_coco import crowded_coco
from stages.engine.coco_eval import BACKENDS, METRIC_NAMES, evaluate_coco


def score(dataset: dict, results: list[dict], limit: int | None = None) -> dict[str, tuple[dict, float]]:
    """backend -> (metrics, seconds) for one evaluation of `results` against `dataset` (its first `limit` images
    by id, as the eval stage's data.limit_val_images)."""
    categories = sorted(dataset["categories"], key=lambda c: c["id"])
    names, cat_ids = [c["name"] for c in categories], [c["id"] for c in categories]
    image_ids = sorted(i["id"] for i in dataset["images"])[:limit]
    scored = {}
    for backend in BACKENDS:
        start = time.perf_counter()
        metrics = evaluate_coco(make_coco(dataset), results, image_ids, names, cat_ids, backend)
        scored[backend] = (metrics, time.perf_counter() - start)
    return scored


def print_table(title: str, rows: dict[str, tuple[dict, float]]) -> None:
    print(f"\n{title}")
    print(f"{'backend':<18}" + "".join(f"{k:>8}" for k in METRIC_NAMES) + f"{'seconds':>10}")
    for backend, (metrics, seconds) in rows.items():
        print(f"{backend:<18}" + "".join(f"{metrics[k]:8.2f}" for k in METRIC_NAMES) + f"{seconds:10.2f}")
    same = all(round(rows[b][0][k], 2) == round(rows[BACKENDS[0]][0][k], 2) for b in rows for k in METRIC_NAMES)
    print(f"identical to two decimals: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=None, help="a run directory with eval/predictions.json")
    parser.add_argument("--images", type=int, default=5000, help="images in the generated set")
    parser.add_argument("--repeats", type=int, default=3, help="evaluations per backend on the generated set")
    args = parser.parse_args()

    if args.run_dir is not None:
        config = OmegaConf.load(args.run_dir / ".hydra" / "config.yaml")
        val_json = Path(str(config.data.root)) / str(config.data.val_json)
        dataset = read_json(val_json)
        validate_coco(dataset, str(val_json))
        results = json.loads((args.run_dir / "eval" / "predictions.json").read_text())
        limit = config.data.get("limit_val_images")
        title = f"{val_json} ({limit or len(dataset['images'])} images, {len(results)} detections)"
        print_table(title, score(dataset, results, limit))

    dataset, results = crowded_coco(seed=0, num_images=args.images)
    timed = {backend: [] for backend in BACKENDS}
    for _ in range(args.repeats):
        for backend, (metrics, seconds) in score(dataset, results).items():
            timed[backend].append((metrics, seconds))
    rows = {b: (runs[0][0], statistics.median(s for _, s in runs)) for b, runs in timed.items()}
    print_table(f"generated set: {args.images} images, {len(results)} detections (median of {args.repeats})", rows)
    speedup = rows[BACKENDS[0]][1] / rows[BACKENDS[1]][1]
    print(f"faster_coco_eval / pycocotools speed: {speedup:.1f}x")


if __name__ == "__main__":
    main()
