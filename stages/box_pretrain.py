"""box_pretrain: AlignDet box-domain pre-training of the whole detector on the training images, labels unused.

Selective-search proposals (cached), the detector's first `model.box_pretrain.max_proposals` of them -> optionally
their pseudo-classes (`stage.pseudo_classes`: k-means cluster ids of backbone features, cached; the DETR's class
heads learn them) -> two augmented views per image sharing proposal ids -> the detector wrapped in
`models.pretrain.aligndet.AlignDet` (online + EMA copy, projectors, box-domain InfoNCE against the other proposals
and background samples, box losses) -> the shared Trainer with an EMA hook. `checkpoint.pth` holds the online
detector alone under the detector's own names (backbone.*, neck.*, transformer.*, ...) plus `drop_keys`, the
patterns of what fine-tuning leaves out (the model config's `align_drop_keys`); `last.pth` keeps the whole wrapper
for resuming.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Mapping

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from models.meta_arch.deformable_detr import DeformableDETR
from models.pretrain.aligndet import AlignDet
from stages.build import build_model, validate_model_config
from stages.context import open_stage
from stages.data.build import build_dataset, build_train_loader, describe_train_set
from stages.data.proposals import proposals_main_first
from stages.data.pseudo_classes import pseudo_classes_main_first
from stages.data.two_view import build_two_view_dataset, collate_two_view
from stages.engine.checkpoint import CHECKPOINT_NAME, checkpoint_identity, load_into, select_state
from stages.engine.distributed import is_distributed
from stages.engine.trainer import Hook, Trainer, to_device, unwrap
from stages.errors import UserError

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
        detr_pseudo_classes=stage_cfg.pseudo_classes.enabled,
    )


def check_pseudo_classes_config(cfg: DictConfig) -> None:
    """Pseudo-classes and objectness both train the DETR class heads, on different targets: one or the other."""
    if cfg.stage.pseudo_classes.enabled and cfg.stage.aligndet.detr_objectness:
        raise UserError(
            "stage.pseudo_classes.enabled=true and stage.aligndet.detr_objectness=true both train the DETR class "
            "heads; expected at most one of them"
        )


def check_pseudo_classes_model(detector: nn.Module, model_name: str) -> None:
    """Pseudo-classes train a DETR class head: the DETR family only (the reference has them for DETR alone)."""
    if not isinstance(detector, DeformableDETR):
        raise UserError(
            f"stage.pseudo_classes.enabled=true: model={model_name} has no DETR class head to train; expected "
            "model=deformable_detr or co_deformable_detr"
        )


def feature_identity(cfg: DictConfig) -> dict:
    """What decides the backbone features the proposals are clustered on, besides the clustering parameters: the
    init checkpoint's identity (its stage fingerprint or sha256; None without init_from), the backbone config
    (architecture, any torchvision weights) and the input normalisation."""
    init_from = cfg.stage.init_from
    detector_cfg = cfg.model.detector
    return {
        "init": checkpoint_identity(init_from) if init_from else None,
        "backbone": OmegaConf.to_container(detector_cfg.backbone, resolve=True),
        "pixel_mean": list(detector_cfg.get("pixel_mean", [])),
        "pixel_std": list(detector_cfg.get("pixel_std", [])),
    }


def clustering_detector(detector: nn.Module, init_from: str | None, resuming: bool) -> nn.Module:
    """The detector whose backbone clusters the proposals (called on a cache miss only): `detector` once
    init_from is in it; a resumed run (whose weights come from last.pth later) clusters with a copy holding
    init_from's."""
    if not (resuming and init_from):
        return detector
    fresh = copy.deepcopy(detector)
    load_into(fresh, init_from)
    return fresh


def run(cfg: DictConfig) -> dict:
    validate_model_config(cfg.model)
    ctx = open_stage(cfg)
    finished = ctx.finished()
    if finished is not None:
        return finished

    # Labels are never read: only the images (for proposals and views) and the dataset's class count (the
    # classifiers exist but go unused, or learn pseudo-classes; fine-tuning drops them). So every training image
    # takes part, whatever the labelled fraction (data.fraction) fine-tuning uses.
    pseudo = cfg.stage.pseudo_classes
    check_pseudo_classes_config(cfg)
    dataset = build_dataset(cfg.data, "train", train=False, seed=cfg.seed, use_fraction=False)
    proposals, stats = proposals_main_first(dataset, cfg.stage.proposals)
    # With pseudo-classes the class heads predict the clusters (and are dropped at fine-tuning all the same).
    detector = build_model(cfg.model, pseudo.num_clusters if pseudo.enabled else dataset.num_classes)
    if pseudo.enabled:
        check_pseudo_classes_model(detector, cfg.model.name)
    init = ctx.load_init(detector)
    pseudo_labels, cluster_stats = None, None
    if pseudo.enabled:
        pseudo_labels, cluster_stats = pseudo_classes_main_first(
            dataset,
            proposals,
            lambda: clustering_detector(detector, cfg.stage.init_from, ctx.resuming),
            pseudo,
            cfg.seed,
            cfg.stage.proposals.cache_dir,
            stats.cache_key,
            feature_identity(cfg),
        )
    limit = proposal_limit(detector, cfg.model.box_pretrain.max_proposals)
    proposals, clamped = clamp_proposals(proposals, limit)
    if clamped:
        log.info("proposals: %d images keep their first %d (model.box_pretrain.max_proposals, queries)", clamped, limit)
    if pseudo_labels is not None:
        pseudo_labels, _ = clamp_proposals(pseudo_labels, limit)
    views = build_two_view_dataset(dataset, proposals, cfg.stage.views, labels=pseudo_labels)

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
            "pseudo_classes": None if cluster_stats is None else dataclasses.asdict(cluster_stats),
        }
    )
