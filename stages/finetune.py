"""finetune: train the detector on labelled images (Co-DETR hybrid assignment when model.num_aux_heads > 0)."""

from __future__ import annotations

import logging
import time

from omegaconf import DictConfig

from stages.build import build_model, validate_model_config
from stages.common import read_json, seed_everything, stage_dir, write_json
from stages.data.build import build_dataset, build_loader
from stages.engine.checkpoint import LAST_NAME, load_into
from stages.engine.distributed import init_distributed, is_distributed
from stages.engine.trainer import Trainer

log = logging.getLogger("detpipe")
# The init_from load report, kept so that a resumed run still reports what it started from.
INIT_REPORT = "init.json"


def run(cfg: DictConfig) -> dict:
    start = time.perf_counter()
    validate_model_config(cfg.model)
    device = init_distributed(cfg.trainer.device, cfg.trainer.dist_backend)
    seed_everything(cfg.seed)
    out = stage_dir(cfg)

    dataset = build_dataset(cfg.data, "train", train=True, seed=cfg.seed)
    model = build_model(cfg.model, dataset.num_classes)
    init = read_json(out / INIT_REPORT)
    # A resumed run takes its weights from last.pth; init_from only seeds a fresh run.
    if cfg.stage.init_from and not (out / LAST_NAME).exists():
        report = load_into(model, cfg.stage.init_from, drop=cfg.stage.get("init_drop", []) or [])
        log.info("%s", report.table())
        init = report.as_dict()
        write_json(out / INIT_REPORT, init)

    loader = build_loader(
        dataset,
        batch_size=cfg.trainer.batch_size,
        num_workers=cfg.trainer.num_workers,
        shuffle=True,
        seed=cfg.seed,
        distributed=is_distributed(),
        drop_last=len(dataset) >= cfg.trainer.batch_size,
    )
    trainer = Trainer(cfg, model, loader, out, "finetune", device)
    result = trainer.train()
    summary = {
        "stage": "finetune",
        "checkpoint": result["checkpoint"],
        "metrics": result["final_losses"],
        "iterations": result["iter"],
        "num_train_images": len(dataset),
        "train_seconds": trainer.train_seconds,
        "seconds": time.perf_counter() - start,
        "init": init,
    }
    write_json(out / "summary.json", summary)
    return summary
