"""eval: COCO box metrics of a checkpoint on the val split, predictions in COCO format, and a few pictures."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from stages.build import build_model
from stages.common import write_json
from stages.context import open_stage
from stages.data.build import build_dataset, build_loader, dataset_categories
from stages.engine.checkpoint import load_into, resolve_checkpoint
from stages.engine.coco_eval import evaluate_coco, format_table, to_coco_results
from stages.engine.distributed import is_main_process
from stages.engine.files import atomic_write_text
from stages.engine.metrics import MetricsLogger
from stages.engine.trainer import to_device
from stages.engine.visualize import draw_detections, save_png
from stages.errors import UserError
from stages.fingerprint import init_source
from stages.onnx_model import OnnxDetector

log = logging.getLogger("detpipe")


@torch.no_grad()
def predict(model: torch.nn.Module, loader, device: torch.device, label_to_cat_id: list[int], num_vis: int):
    """COCO results for every image, plus the first `num_vis` (image, target, prediction) for pictures."""
    results, shown = [], []
    for images, targets in tqdm(loader, desc="eval", disable=not is_main_process(), dynamic_ncols=True):
        outputs = model(to_device(images, device))
        for image, target, output in zip(images, targets, outputs, strict=True):
            h, w = target["size"].tolist()
            orig_h, orig_w = target["orig_size"].tolist()
            results += to_coco_results(target["image_id"], output, (orig_w / w, orig_h / h), label_to_cat_id)
            if len(shown) < num_vis:
                shown.append((image, target, {k: v.cpu() for k, v in output.items()}))
    return results, shown


def wandb_box_image(
    image: torch.Tensor, target: dict, pred: dict[str, torch.Tensor], class_names: list[str], score_threshold: float
):
    """A `wandb.Image` of `image` (CHW in [0, 1]) with two box overlays W&B can toggle and filter: "ground_truth"
    (the target's boxes) and "predictions" (scores >= `score_threshold`), in the image's pixel coordinates and
    labelled with class names. Called only when the W&B logger is on."""
    import wandb

    labels = dict(enumerate(class_names))

    def box(xyxy: list[float], label: int, caption: str, scores: dict | None = None) -> dict:
        x0, y0, x1, y1 = xyxy
        item = {
            "position": {"minX": x0, "minY": y0, "maxX": x1, "maxY": y1},
            "domain": "pixel",
            "class_id": int(label),
            "box_caption": caption,
        }
        if scores is not None:
            item["scores"] = scores
        return item

    truth = [box(b, c, class_names[c]) for b, c in zip(target["boxes"].tolist(), target["labels"].tolist())]
    keep = pred["scores"] >= score_threshold
    predictions = [
        box(b, c, f"{class_names[c]} {s:.2f}", {"score": s})
        for b, c, s in zip(pred["boxes"][keep].tolist(), pred["labels"][keep].tolist(), pred["scores"][keep].tolist())
    ]
    pixels = (image.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).astype("uint8")
    return wandb.Image(
        pixels,
        caption=f"image {int(target['image_id'])}",
        boxes={
            "predictions": {"box_data": predictions, "class_labels": labels},
            "ground_truth": {"box_data": truth, "class_labels": labels},
        },
        classes=wandb.Classes([{"id": i, "name": name} for i, name in labels.items()]),
    )


def check_categories(
    source: str, stage: str | None, categories: list[dict] | None, dataset, allow_untrained_head: bool
) -> None:
    """The model's class head must predict the val set's categories: a checkpoint that records none (its class head
    never saw labels, e.g. box_pretrain's) is refused unless `allow_untrained_head`, and one trained on other
    categories always is."""
    expected = dataset_categories(dataset)
    if categories is None:
        if allow_untrained_head:
            log.warning("%s: records no categories; its class head was not trained on labels", source)
            return
        raise UserError(
            f"{source}: a {stage or 'foreign'} checkpoint that records no categories, so its class "
            "head was not trained on labels; expected a finetune checkpoint (stage.allow_untrained_head=true "
            "evaluates it anyway)"
        )
    if categories != expected:
        theirs = {(c["id"], c["name"]) for c in categories}
        ours = {(c["id"], c["name"]) for c in expected}
        raise UserError(
            f"{source}: trained on {len(theirs)} categories, {dataset.source} has {len(ours)}; only in the "
            f"checkpoint: {sorted(theirs - ours)[:5]}, only in the val set: {sorted(ours - theirs)[:5]}; expected "
            "the same category ids and names in the same order"
        )


def load_model(cfg: DictConfig, checkpoint: Path, dataset) -> torch.nn.Module | OnnxDetector:
    """The model to evaluate: an exported model.onnx through ONNX Runtime, or the checkpoint's weights in the
    plain DETR (auxiliary heads of a Co-DETR checkpoint are reported as skipped); its categories checked."""
    allow = bool(cfg.stage.get("allow_untrained_head", False))
    if checkpoint.suffix == ".onnx":
        model = OnnxDetector(checkpoint)
        check_categories(str(checkpoint), "export", model.categories, dataset, allow)
        return model
    model = build_model(cfg.model, dataset.num_classes, num_aux_heads=0)
    report = load_into(model, checkpoint)
    log.info("%s", report.table())
    check_categories(report.source, report.stage, report.categories, dataset, allow)
    return model


def run(cfg: DictConfig) -> dict:
    ctx = open_stage(cfg)
    out, device = ctx.out, ctx.device
    checkpoint = resolve_checkpoint(init_source(cfg))

    dataset = build_dataset(cfg.data, "val", train=False, seed=cfg.seed)
    model = load_model(cfg, checkpoint, dataset).to(device).eval()
    loader = build_loader(
        dataset,
        batch_size=cfg.stage.batch_size,
        num_workers=cfg.trainer.num_workers,
        shuffle=False,
        seed=cfg.seed,
        distributed=False,
        drop_last=False,
    )
    results, shown = predict(model, loader, device, dataset.label_to_cat_id, cfg.stage.num_vis)
    cat_ids = list(dataset.label_to_cat_id)
    bbox = evaluate_coco(dataset.coco, results, dataset.image_ids, dataset.class_names, cat_ids, cfg.stage.backend)

    atomic_write_text(out / "predictions.json", json.dumps(results))
    write_json(out / "metrics.json", {"bbox": bbox})
    for i, (image, target, pred) in enumerate(shown):
        rgb = draw_detections(image, target["boxes"], pred, dataset.class_names, cfg.stage.vis_score_threshold)
        save_png(out / "vis" / f"{i:02d}_{int(target['image_id'])}.png", rgb)
    print(format_table(bbox))

    metrics_logger = MetricsLogger(out, "eval", cfg)
    metrics_logger.log(0, {f"eval/{k}": v for k, v in bbox.items() if k != "per_class"}, console=False)
    metrics_logger.summary(
        {
            **{f"eval/{k}": v for k, v in bbox.items() if k != "per_class"},
            **{f"eval_per_class/{name}": ap for name, ap in bbox["per_class"].items()},
        }
    )
    if metrics_logger.wandb is not None:
        images = {
            f"eval_vis/{i:02d}_{int(target['image_id'])}": wandb_box_image(
                image, target, pred, dataset.class_names, cfg.stage.vis_score_threshold
            )
            for i, (image, target, pred) in enumerate(shown)
        }
        metrics_logger.log_images(images, step=0)
    metrics_logger.close()

    return ctx.write_summary(
        {
            "checkpoint": str(checkpoint),
            "metrics": {k: v for k, v in bbox.items() if k != "per_class"},
            "num_images": len(dataset),
        }
    )
