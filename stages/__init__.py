"""Staged jobs. Each stage module exposes `run(cfg) -> dict` (its summary)."""

import importlib
from collections.abc import Callable

from omegaconf import DictConfig

from stages.errors import UserError

# stage name (cfg.stage.name) -> module under stages/
STAGE_MODULES = {
    "image_pretrain": "stages.image_pretrain",
    "box_pretrain": "stages.box_pretrain",
    "finetune": "stages.finetune",
    "eval": "stages.evaluate",
    "pipeline": "stages.pipeline",
    "report": "stages.report",
    "predict": "stages.predict",
    "export": "stages.export",
}


def get_stage(name: str) -> Callable[[DictConfig], dict]:
    """The `run` function of stage `name`."""
    if name not in STAGE_MODULES:
        raise UserError(f"stage.name: unknown stage {name!r}; expected one of {sorted(STAGE_MODULES)}")
    return importlib.import_module(STAGE_MODULES[name]).run
