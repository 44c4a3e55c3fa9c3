"""Small pieces every stage uses: its output directory, seeding, summaries."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from stages.engine.checkpoint import atomic_write_text
from stages.engine.distributed import is_main_process
from stages.errors import UserError

log = logging.getLogger("detpipe")


def instantiate_or_user_error(config: Any, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, letting a UserError raised by a constructor through as itself (Hydra wraps
    every constructor error in a multi-line InstantiationException)."""
    try:
        return instantiate(config, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, UserError):
            raise err.__cause__ from None
        raise


def stage_dir(cfg: DictConfig, name: str | None = None) -> Path:
    """<run_dir>/<stage>: the only place a stage writes."""
    path = Path(cfg.paths.run_dir) / (name or cfg.stage.name)
    path.mkdir(parents=True, exist_ok=True)
    return path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def write_json(path: Path, payload: dict) -> None:
    """Atomic JSON write (main process only)."""
    if is_main_process():
        atomic_write_text(path, json.dumps(payload, indent=2, default=str) + "\n")


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None when the file does not exist."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None


def read_summary(directory: Path) -> dict | None:
    return read_json(Path(directory) / "summary.json")
