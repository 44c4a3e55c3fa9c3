"""box_pretrain: AlignDet box-domain pre-training of the whole detector on the training images, labels unused.

Selective-search proposals (cached) -> two augmented views per image sharing proposal ids -> the detector wrapped
in `models.pretrain.aligndet.AlignDet` (online + EMA copy, projectors, box-domain InfoNCE and box losses) -> the shared
Trainer with an EMA hook. `checkpoint.pth` holds the online detector alone under the detector's own names
(backbone.*, neck.*, transformer.*, ...) plus `drop_keys`, the classifier keys fine-tuning should leave out;
`last.pth` keeps the whole wrapper for resuming.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from models.pretrain.aligndet import AlignDet
from stages.build import build_model, validate_model_config
from stages.context import open_stage
from stages.data.build import build_dataset, build_train_loader, describe_train_set
from stages.data.proposals import proposals_main_first
from stages.data.two_view import build_two_view_dataset, collate_two_view
from stages.engine.checkpoint import CHECKPOINT_NAME, select_state
from stages.engine.distributed import is_distributed
from stages.engine.trainer import Hook, Trainer, to_device, unwrap

log = logging.getLogger("detpipe")
# The AlignDet wrapper's attribute holding the online detector: its keys are "<attr>.<detector key>".
DETECTOR_ATTR = "detector"


class MomentumUpdate(Hook):
    """AlignDet's EMA update after every optimisation step, momentum on a cosine schedule over the run."""

    def after_step(self, trainer: Trainer) -> None:
        unwrap(trainer.model).update_momentum(trainer.iter / trainer.max_iters)


def two_view_forward(model: nn.Module, batch, device: torch.device) -> dict[str, torch.Tensor]:
    """A `collate_two_view` batch (images1, targets1, images2, targets2) through AlignDet."""
    images1, targets1, images2, targets2 = to_device(batch, device)
    return model(images1, targets1, images2, targets2)


def proposal_limit(detector: nn.Module, max_per_image: int | None) -> int | None:
    """Proposals kept per image: at most the detector's `num_queries` (a DETR can match no more) and at most
    `max_per_image` (model.box_pretrain.max_proposals); None when neither bounds it."""
    bounds = [b for b in (getattr(detector, "num_queries", None), max_per_image) if b is not None]
    return min(bounds) if bounds else None


def clamp_proposals(proposals: Mapping, limit: int | None) -> tuple[dict, int]:
    """The first `limit` proposals of each image (selective search's order, as the reference's top-k) and the
    number of images that lost some."""
    if limit is None:
        return dict(proposals), 0
    clamped = sum(1 for boxes in proposals.values() if len(boxes) > limit)
    return {image_id: np.asarray(boxes)[:limit] for image_id, boxes in proposals.items()}, clamped


def build_aligndet(detector: nn.Module, stage_cfg: DictConfig) -> AlignDet:
    a = stage_cfg.aligndet
    return AlignDet(
        detector,
        projector_hidden_dim=a.projector_hidden_dim,
        projector_out_dim=a.projector_out_dim,
        temperature=a.temperature,
        base_momentum=a.base_momentum,
        contrastive_weight=a.contrastive_weight,
        freeze_backbone=stage_cfg.freeze_backbone,
        max_background=a.max_background,
        detr_all_layers=a.detr_all_layers,
        detr_objectness=a.detr_objectness,
    )


def run(cfg: DictConfig) -> dict:
    validate_model_config(cfg.model)
    ctx = open_stage(cfg)
    finished = ctx.finished()
    if finished is not None:
        return finished

    # Labels are never read: only the images (for proposals and views) and the dataset's class count (the
    # classifiers exist but go unused; fine-tuning drops them). So every training image takes part, whatever the
    # labelled fraction (data.fraction) fine-tuning uses.
    dataset = build_dataset(cfg.data, "train", train=False, seed=cfg.seed, use_fraction=False)
    proposals, stats = proposals_main_first(dataset, cfg.stage.proposals)
    detector = build_model(cfg.model, dataset.num_classes)
    limit = proposal_limit(detector, cfg.model.box_pretrain.max_proposals)
    proposals, clamped = clamp_proposals(proposals, limit)
    if clamped:
        log.info("proposals: %d images keep their first %d proposals (the detector's queries)", clamped, limit)
    views = build_two_view_dataset(dataset, proposals, cfg.stage.views)

    init = ctx.load_init(detector)
    if cfg.stage.freeze_backbone and not cfg.stage.init_from:
        log.warning("box_pretrain: stage.freeze_backbone=true without stage.init_from: the backbone stays random")
    model = build_aligndet(detector, cfg.stage)

    source = describe_train_set(dataset, cfg.data, use_fraction=False) + " with proposals"
    loader = build_train_loader(
        views, cfg.trainer, cfg.seed, distributed=is_distributed(), collate_fn=collate_two_view, source=source
    )
    drop_keys = model.align_drop_keys(detector)

    def save_final(trainer: Trainer) -> None:
        # The online detector alone, under its own names; last.pth keeps the whole wrapper for resuming.
        detector_state = select_state(unwrap(trainer.model).state_dict(), prefix=f"{DETECTOR_ATTR}.")
        ctx.save_final(detector_state, trainer.iter, drop_keys=list(drop_keys))

    trainer = ctx.trainer(model, loader, forward_fn=two_view_forward, hooks=[MomentumUpdate()], final=save_final)
    result = trainer.train()
    checkpoint = ctx.out / CHECKPOINT_NAME

    return ctx.write_summary(
        {
            "checkpoint": str(checkpoint),
            "metrics": result["final_losses"],
            "iterations": result["iter"],
            "num_train_images": len(views),
            "train_seconds": trainer.train_seconds,
            "seconds_per_iter": trainer.train_seconds / max(1, result["iter"]),
            "init": init,
            "freeze_backbone": bool(cfg.stage.freeze_backbone),
            "branches": list(model.feature_dims),
            "drop_keys": drop_keys,
            "proposals": {
                "num_images": stats.num_images,
                "num_skipped": stats.num_skipped,
                "num_boxes": stats.num_boxes,
                "boxes_per_image": stats.boxes_per_image,
                "seconds": stats.seconds,
                "images_per_second": stats.images_per_second,
                "cache_hit": stats.cache_hit,
                "cache_path": stats.cache_path,
                "per_image_limit": limit,
                "num_images_clamped": clamped,
            },
        }
    )
