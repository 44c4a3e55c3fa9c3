"""How well a DETR-family checkpoint localises objects, whatever its class head says: the class-agnostic recall of
the val ground-truth boxes by the boxes of all its queries (last decoder layer).

    python benchmarks/box_recall.py --checkpoint RUN/box_pretrain [--checkpoint ...] [--iou 0.5 0.7] [--proposals]
        [overrides ...]

Box pre-training has no classes, so AP cannot say how far it got; this can. A ground-truth box counts as recalled
at IoU t when some query's box overlaps it by at least t. Checkpoints are files or stage directories
(image_pretrain, box_pretrain, finetune); tensors a checkpoint lacks (an image_pretrain's decoder) stay at their
seeded initialisation, so an image_pretrain row is the untrained decoder's baseline. `--proposals` adds the same
recall for the selective-search proposals box_pretrain trains on (stage=box_pretrain's settings and cache), on the
train objects: the ceiling of what box pre-training can teach.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torchvision.ops import box_iou

from models.layers.box_coding import denormalize_boxes
from models.meta_arch.deformable_detr import DeformableDETR
from stages.build import build_model
from stages.data.build import build_dataset
from stages.data.proposals import load_or_compute_proposals
from stages.engine.checkpoint import load_into

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"


@torch.no_grad()
def query_boxes(model: DeformableDETR, image: torch.Tensor) -> torch.Tensor:
    """[Q, 4] xyxy boxes of every query of the last decoder layer, in the image's pixels."""
    tensor, mask, sizes = model.preprocess([image])
    encoded = model.encode(tensor, mask)
    queries = model.initial_queries(encoded)
    decoded = model.decode_queries(encoded, queries.content, queries.pos, queries.reference)
    return denormalize_boxes(decoded.boxes[-1, 0].float(), sizes[0])


def recall(pairs, thresholds: list[float]) -> tuple[dict[float, float], int]:
    """({t: % of ground-truth boxes recalled at IoU t}, number of ground-truth boxes) over (truth [N, 4],
    candidates [M, 4]) pairs, xyxy in the same pixels."""
    hits = dict.fromkeys(thresholds, 0)
    total = 0
    for truth, candidates in pairs:
        truth = truth.reshape(-1, 4)
        total += len(truth)
        if len(truth) == 0 or len(candidates) == 0:
            continue
        best = box_iou(truth, candidates.reshape(-1, 4)).max(dim=1).values
        for t in thresholds:
            hits[t] += int((best >= t).sum())
    return {t: 100.0 * hits[t] / max(total, 1) for t in thresholds}, total


def model_pairs(model: DeformableDETR, dataset):
    for index in range(len(dataset)):
        image, target = dataset[index]
        yield target["boxes"], query_boxes(model, image)


def proposal_pairs(cfg):
    """(train objects, their image's cached proposals) in file pixels; computes the cache when missing."""
    dataset = build_dataset(cfg.data, "train", train=False, seed=cfg.seed)
    proposals, _ = load_or_compute_proposals(
        dataset, cfg.stage.proposals, cfg.stage.proposals.cache_dir, cfg.stage.proposals.num_workers
    )
    for index, image_id in enumerate(dataset.image_ids):
        boxes = proposals.get(image_id)
        yield (
            dataset.raw_target(index)["boxes"],
            torch.as_tensor(boxes if boxes is not None else [], dtype=torch.float32),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", default=[], help="checkpoint file or stage dir")
    parser.add_argument("--proposals", action="store_true", help="also the selective-search proposals' recall")
    parser.add_argument("--iou", type=float, nargs="+", default=[0.5, 0.7])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. paths.data_dir=/tmp/data")
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config", overrides=["stage=box_pretrain", "paths.run_dir=/tmp/box_recall", *args.overrides]
        )
    dataset = build_dataset(cfg.data, "val", train=False)
    print(f"{'boxes':<60}" + "".join(f"{f'recall@{t:g} %':>14}" for t in args.iou))
    if args.proposals:
        values, total = recall(proposal_pairs(cfg), args.iou)
        name = f"selective-search proposals ({total} train objects)"
        print(f"{name:<60}" + "".join(f"{values[t]:>14.1f}" for t in args.iou))
    for source in args.checkpoint:
        torch.manual_seed(args.seed)
        model = build_model(cfg.model, dataset.num_classes)
        if not isinstance(model, DeformableDETR):
            raise SystemExit(f"model {type(model).__name__}: box_recall reads DETR-family decoders only")
        # Every tensor that fits, the box heads that fine-tuning would drop included: this measures the checkpoint
        # itself. Tensors it lacks (an image_pretrain's decoder) keep their seeded initialisation.
        load_into(model, source, checkpoint_drops=False)
        values, total = recall(model_pairs(model.eval(), dataset), args.iou)
        print(f"{source[-60:]:<60}" + "".join(f"{values[t]:>14.1f}" for t in args.iou))
    if args.checkpoint:
        print(f"(checkpoints: {total} val ground-truth boxes, all {model.num_queries} queries, class-agnostic)")


if __name__ == "__main__":
    main()
