"""Proposal throughput: fresh selective search with 0 (in-process), 1 and 2 worker processes, then a cache hit.

    python benchmarks/proposals.py [hydra overrides, e.g. stage.proposals.mode=fast data.limit_train_images=100]

Uses the configured dataset's train split (default: the built-in synthetic one) and `stage=box_pretrain`'s
proposal parameters; each fresh run writes to its own empty cache folder. Prints one table.
"""

import logging
import sys
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir

from stages.data.build import build_dataset
from stages.data.proposals import load_or_compute_proposals

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"
WORKER_COUNTS = (0, 1, 2)


def main(overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["stage=box_pretrain", *overrides])
    dataset = build_dataset(cfg.data, "train", train=False, seed=cfg.seed)
    proposals_cfg = cfg.stage.proposals
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for workers in WORKER_COUNTS:
            cache_dir = Path(tmp) / f"workers{workers}"
            _, stats = load_or_compute_proposals(dataset, proposals_cfg, cache_dir, workers)
            rows.append((f"fresh, {workers} workers" if workers else "fresh, in-process", stats))
        _, stats = load_or_compute_proposals(dataset, proposals_cfg, cache_dir, WORKER_COUNTS[-1])
        assert stats.cache_hit, "the second call with the same parameters should read the cache"
        rows.append(("cache hit", stats))

    print(
        f"\ndataset {cfg.data.name} ({len(dataset)} images), mode={proposals_cfg.mode} scale={proposals_cfg.scale} "
        f"sigma={proposals_cfg.sigma} max_side={proposals_cfg.max_side} min_size={proposals_cfg.min_size} "
        f"nms_iou={proposals_cfg.nms_iou} max_per_image={proposals_cfg.max_per_image}"
    )
    print(f"| {'run':<22} | {'seconds':>8} | {'images/s':>9} | {'boxes/image':>11} | {'skipped':>7} |")
    print(f"|{'-' * 24}|{'-' * 10}|{'-' * 11}|{'-' * 13}|{'-' * 9}|")
    for name, stats in rows:
        print(
            f"| {name:<22} | {stats.seconds:>8.2f} | {stats.images_per_second:>9.1f} | "
            f"{stats.boxes_per_image:>11.1f} | {stats.num_skipped:>7d} |"
        )


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main(sys.argv[1:])
