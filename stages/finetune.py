"""finetune: train the detector on labelled images (Co-DETR hybrid assignment when model.num_aux_heads > 0),
then, with `stage.evaluate`, evaluate the final checkpoint into <run_dir>/eval.

A finished run (summary.json and checkpoint.pth present) is not trained again: re-running a sweep into the same
`hydra.sweep.dir` skips its finished jobs, and an unfinished one resumes from last.pth (the Trainer).
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

from omegaconf import DictConfig, open_dict

from stages import evaluate
from stages.build import build_model, validate_model_config
from stages.common import read_json, read_summary, seed_everything, stage_dir, write_json
from stages.data.build import build_dataset, build_train_loader
from stages.engine.checkpoint import CHECKPOINT_NAME, LAST_NAME, load_into
from stages.engine.distributed import init_distributed, is_distributed, is_main_process
from stages.engine.trainer import Trainer
from stages.pipeline import compose_stage, job_overrides

log = logging.getLogger("detpipe")
# The init_from load report, kept so that a resumed run still reports what it started from.
INIT_REPORT = "init.json"


def run(cfg: DictConfig) -> dict:
    """Train (or skip when finished), evaluate when `stage.evaluate`; returns and writes finetune/summary.json:
    stage, checkpoint, metrics (final losses), iterations, num_train_images, train_seconds, seconds, init, and
    with `stage.evaluate` eval (the eval stage's AP metrics)."""
    start = time.perf_counter()
    validate_model_config(cfg.model)
    device = init_distributed(cfg.trainer.device, cfg.trainer.dist_backend)
    seed_everything(cfg.seed)
    out = stage_dir(cfg)

    finished = read_summary(out)
    if finished is not None and (out / CHECKPOINT_NAME).is_file():
        log.info("[finetune] already finished in %s; skipping its training", out)
        if cfg.stage.get("evaluate", False) and "eval" not in finished and is_main_process():
            finished["eval"] = evaluate_checkpoint(cfg, out / CHECKPOINT_NAME)
            write_json(out / "summary.json", finished)
        return finished

    dataset = build_dataset(cfg.data, "train", train=True, seed=cfg.seed)
    model = build_model(cfg.model, dataset.num_classes)
    init = read_json(out / INIT_REPORT)
    # A resumed run takes its weights from last.pth; init_from only seeds a fresh run.
    if cfg.stage.init_from and not (out / LAST_NAME).exists():
        report = load_into(model, cfg.stage.init_from, drop=cfg.stage.get("init_drop", []) or [])
        log.info("%s", report.table())
        init = report.as_dict()
        write_json(out / INIT_REPORT, init)

    loader = build_train_loader(dataset, cfg.trainer, cfg.seed, distributed=is_distributed())
    trainer = Trainer(cfg, model, loader, out, "finetune", device)
    result = trainer.train()
    summary = {
        "stage": "finetune",
        "checkpoint": result["checkpoint"],
        "metrics": result["final_losses"],
        "iterations": result["iter"],
        "num_train_images": len(dataset),
        "train_seconds": trainer.train_seconds,
        "init": init,
    }
    # Under DDP only rank 0 evaluates (the eval loader is not sharded; the other ranks are done after training).
    if cfg.stage.get("evaluate", False) and is_main_process():
        summary["eval"] = evaluate_checkpoint(cfg, Path(result["checkpoint"]))
    summary["seconds"] = time.perf_counter() - start
    # Written last: its presence (with checkpoint.pth) marks the run finished, evaluation included.
    write_json(out / "summary.json", summary)
    return summary


def eval_config(cfg: DictConfig, checkpoint: Path) -> DictConfig:
    """The eval stage's config for `checkpoint`: this run's config (model, data, trainer, logger, seed, paths)
    with the `stage` node `python run.py stage=eval <this job's overrides>` would get."""
    composed = compose_stage("eval", job_overrides(), str(cfg.paths.run_dir), str(checkpoint))
    eval_cfg = copy.deepcopy(cfg)
    with open_dict(eval_cfg):
        eval_cfg.stage = composed.stage
    return eval_cfg


def evaluate_checkpoint(cfg: DictConfig, checkpoint: Path) -> dict:
    """Run the eval stage on `checkpoint` into <run_dir>/eval; its AP metrics (AP, AP50, ..., APl)."""
    log.info("[finetune] evaluating %s into %s", checkpoint, Path(str(cfg.paths.run_dir)) / "eval")
    return evaluate.run(eval_config(cfg, checkpoint))["metrics"]
