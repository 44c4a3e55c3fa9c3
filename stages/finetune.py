"""finetune: train the detector on labelled images (Co-DETR hybrid assignment when model.num_aux_heads > 0),
then, with `stage.evaluate`, evaluate the final checkpoint into <run_dir>/eval.

A finished run (summary.json and checkpoint.pth under the same fingerprint) is not trained again: re-running a
sweep into the same `hydra.sweep.dir` skips its finished jobs, and an unfinished one resumes from last.pth.
checkpoint.pth is the full training state plus the categories the class head predicts.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from omegaconf import DictConfig, open_dict

from stages import evaluate
from stages.build import build_model, validate_model_config
from stages.common import write_json
from stages.context import open_stage
from stages.data.build import build_dataset, build_train_loader, dataset_categories, describe_train_set
from stages.engine.checkpoint import CHECKPOINT_NAME
from stages.engine.distributed import is_distributed, is_main_process
from stages.engine.trainer import Trainer
from stages.pipeline import compose_stage, job_overrides

log = logging.getLogger("detpipe")


def run(cfg: DictConfig) -> dict:
    """Train (or skip when finished), evaluate when `stage.evaluate`; returns and writes finetune/summary.json:
    stage, checkpoint, metrics (final losses), iterations, num_train_images, train_seconds, seconds, init,
    fingerprint, and with `stage.evaluate` eval (the eval stage's AP metrics)."""
    validate_model_config(cfg.model)
    ctx = open_stage(cfg)
    finished = ctx.finished()
    if finished is not None:
        if cfg.stage.get("evaluate", False) and "eval" not in finished and is_main_process():
            finished["eval"] = evaluate_checkpoint(cfg, ctx.out / CHECKPOINT_NAME)
            write_json(ctx.out / "summary.json", finished)
        return finished

    dataset = build_dataset(cfg.data, "train", train=True, seed=cfg.seed)
    model = build_model(cfg.model, dataset.num_classes)
    init = ctx.load_init(model, drop=cfg.stage.get("init_drop", []) or [])
    loader = build_train_loader(
        dataset, cfg.trainer, cfg.seed, distributed=is_distributed(), source=describe_train_set(dataset, cfg.data)
    )
    categories = dataset_categories(dataset)

    def save_final(trainer: Trainer) -> None:
        # checkpoint.pth: the full training state (as last.pth, without the generators) and the categories.
        state = trainer.state_dict()
        ctx.save_final(state.pop("model"), state.pop("iter"), categories=categories, **state)

    trainer = ctx.trainer(model, loader, final=save_final, categories=categories)
    result = trainer.train()
    checkpoint = ctx.out / CHECKPOINT_NAME
    summary = {
        "checkpoint": str(checkpoint),
        "metrics": result["final_losses"],
        "iterations": result["iter"],
        "num_train_images": len(dataset),
        "train_seconds": trainer.train_seconds,
        "init": init,
    }
    # Under DDP only rank 0 evaluates (the eval loader is not sharded; the other ranks are done after training).
    if cfg.stage.get("evaluate", False) and is_main_process():
        summary["eval"] = evaluate_checkpoint(cfg, checkpoint)
    # Written last: its presence (with checkpoint.pth) marks the run finished, evaluation included.
    return ctx.write_summary(summary)


def eval_config(cfg: DictConfig, checkpoint: Path) -> DictConfig:
    """The eval stage's config for `checkpoint`: this run's config (model, data, trainer, logger, seed, paths)
    with the `stage` node `python run.py stage=eval <this job's overrides>` would get."""
    composed = compose_stage("eval", job_overrides(), str(cfg.paths.run_dir), str(checkpoint))
    eval_cfg = copy.deepcopy(cfg)
    with open_dict(eval_cfg):
        eval_cfg.stage = composed.stage
        # eval writes <run_dir>/eval, not this stage's directory.
        eval_cfg.paths.stage_dir = None
    return eval_cfg


def evaluate_checkpoint(cfg: DictConfig, checkpoint: Path) -> dict:
    """Run the eval stage on `checkpoint` into <run_dir>/eval; its AP metrics (AP, AP50, ..., APl)."""
    log.info("[finetune] evaluating %s into %s", checkpoint, Path(str(cfg.paths.run_dir)) / "eval")
    return evaluate.run(eval_config(cfg, checkpoint))["metrics"]
