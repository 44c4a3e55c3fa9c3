"""image_pretrain: the backbone that box_pretrain and finetune start from.

`stage.method`: `self_supervised` (MoCo v3 or BYOL on the training images' selective-search proposal crops, or on
the whole images; labels unused), `supervised` (classification of
the ground-truth object crops, or of the images of a local ImageFolder when `stage.supervised.image_folder` is set)
or `import` (weights already on disk: torchvision, timm, detectron2, MoCo, BYOL).
Whatever the method, `checkpoint.pth` holds the backbone alone under the detector's names (`backbone.body.*`), so
`stage.init_from=<this stage's dir>` loads it into any detector built on the same backbone.
"""

from __future__ import annotations

import logging

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset

from stages.backbone_import import load_into_backbone
from stages.common import instantiate_or_user_error
from stages.context import open_stage
from stages.data.build import build_dataset, build_train_loader
from stages.data.proposals import proposals_main_first
from stages.data.ssl_views import ProposalCropViews, TwoViewDataset
from stages.engine.checkpoint import CHECKPOINT_NAME, select_state
from stages.engine.distributed import is_distributed
from stages.engine.trainer import Hook, Trainer, unwrap
from stages.errors import UserError

log = logging.getLogger("detpipe")
# The detector's attribute that holds the backbone: checkpoint keys are "<prefix>.<backbone key>".
BACKBONE_PREFIX = "backbone"
# stage.self_supervised.algorithm: the keys of stage.self_supervised that hold each method's model.
SSL_ALGORITHMS = ("mocov3", "byol")


class BackboneOnly(nn.Module):
    """The backbone under the detector's name, so that `load_into` reports and loads it like any checkpoint."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone


class TargetUpdate(Hook):
    """The momentum encoder's update after every optimisation step, on a cosine schedule over the run."""

    def after_step(self, trainer: Trainer) -> None:
        unwrap(trainer.model).update_target(trainer.iter / trainer.max_iters)


def pair_forward(model: nn.Module, batch, device: torch.device) -> dict[str, torch.Tensor]:
    """Both methods' batches are two lists (view1, view2) or (crops, labels)."""
    first, second = batch
    return model(torch.stack(first).to(device), torch.stack(second).to(device))


def module_prefix(model: nn.Module, module: nn.Module) -> str:
    """The state-dict prefix ("online_encoder.", "encoder.") under which `model` holds `module`."""
    for name, candidate in model.named_modules():
        if candidate is module:
            return f"{name}." if name else ""
    raise ValueError(f"{type(model).__name__} does not hold the backbone module")


def classifier_training(
    cfg: DictConfig, backbone: nn.Module, crops: Dataset, source: str
) -> tuple[nn.Module, Dataset, list[Hook], dict]:
    """(model, train set, hooks, input description) for the supervised method on `crops`."""
    model = instantiate(cfg.stage.supervised.model, encoder=backbone, num_classes=crops.num_classes)
    return model, crops, [], {"input": source, "num_classes": crops.num_classes, "num_items": len(crops)}


def build_training(cfg: DictConfig, backbone: nn.Module) -> tuple[nn.Module, Dataset, list[Hook], dict]:
    """(model, train set, hooks, input description for the summary) for the two training methods."""
    method = cfg.stage.method
    if method == "supervised" and cfg.stage.supervised.image_folder:
        crops = instantiate_or_user_error(cfg.stage.supervised.folder_crops, root=cfg.stage.supervised.image_folder)
        return classifier_training(cfg, backbone, crops, f"image_folder: {crops.root}")
    # Both methods read plain images (no detection transforms). The self-supervised method reads no labels, so it
    # sees every training image, whatever the labelled fraction (data.fraction); the crop classifier reads labels.
    dataset = build_dataset(cfg.data, "train", train=False, seed=cfg.seed, use_fraction=method == "supervised")
    if method == "supervised":
        crops = instantiate_or_user_error(cfg.stage.supervised.crops, source=dataset)
        return classifier_training(cfg, backbone, crops, "ground_truth_crops")
    ssl = cfg.stage.self_supervised
    if ssl.algorithm not in SSL_ALGORITHMS:
        raise UserError(
            f"stage.self_supervised.algorithm: unknown {ssl.algorithm!r}; expected one of {', '.join(SSL_ALGORITHMS)}"
        )
    transform = instantiate(ssl.augmentation)
    if ssl.views == "proposals":
        proposals, _ = proposals_main_first(dataset, cfg.stage.proposals)
        views = ProposalCropViews(dataset, proposals, ssl.crop_context, transform)
    elif ssl.views == "images":
        views = TwoViewDataset(dataset, transform)
    else:
        raise UserError(f"stage.self_supervised.views: unknown {ssl.views!r}; expected proposals or images")
    model = instantiate(ssl[ssl.algorithm], encoder=backbone)
    source = {"input": f"train_{ssl.views}", "algorithm": ssl.algorithm, "num_items": len(views)}
    return model, views, [TargetUpdate()], source


def run(cfg: DictConfig) -> dict:
    method = cfg.stage.method
    if method not in ("self_supervised", "supervised", "import"):
        raise UserError(f"stage.method: unknown method {method!r}; expected self_supervised, supervised or import")
    if cfg.stage.supervised.image_folder and method != "supervised":
        raise UserError(
            f"stage.supervised.image_folder: set, but stage.method is {method}; expected stage.method=supervised "
            "(only the supervised method reads an ImageFolder)"
        )
    if method == "import" and not cfg.stage.weights:
        raise UserError("stage.weights: not set; expected the path of a backbone weights file for method=import")
    ctx = open_stage(cfg)
    finished = ctx.finished()
    if finished is not None:
        return finished
    backbone = instantiate(cfg.model.detector.backbone)
    summary = {"method": method}

    if method == "import":
        report = load_into_backbone(
            backbone.body, cfg.stage.weights, cfg.stage.min_match_fraction, cfg.stage.allow_pickle
        )
        state = select_state(backbone.state_dict(), rename=f"{BACKBONE_PREFIX}.")
        checkpoint = ctx.save_final(state, 0, **{"import": report.as_dict()})
        summary.update({"checkpoint": str(checkpoint), "metrics": {"loaded": len(report.loaded)}})
        summary["import"] = report.as_dict()
        return ctx.write_summary(summary)

    ctx.load_init(BackboneOnly(backbone))
    model, train_set, hooks, source = build_training(cfg, backbone)
    summary.update(source)
    log.info("image_pretrain %s: %s", method, source)
    # BatchNorm needs at least two samples per step: whole batches only.
    loader = build_train_loader(train_set, cfg.trainer, cfg.seed, distributed=is_distributed(), source=source["input"])
    prefix = module_prefix(model, backbone)

    def save_final(trainer: Trainer) -> None:
        # The backbone alone under the detector's names (what later stages load); last.pth keeps the whole
        # wrapper for resuming.
        state = select_state(unwrap(trainer.model).state_dict(), prefix=prefix, rename=f"{BACKBONE_PREFIX}.")
        ctx.save_final(state, trainer.iter)

    trainer = ctx.trainer(model, loader, forward_fn=pair_forward, hooks=hooks, final=save_final)
    result = trainer.train()
    checkpoint = ctx.out / CHECKPOINT_NAME
    summary.update(
        {
            "checkpoint": str(checkpoint),
            "metrics": result["final_losses"],
            "iterations": result["iter"],
            "train_seconds": trainer.train_seconds,
        }
    )
    return ctx.write_summary(summary)
