"""Small pieces every stage uses: its output directory, seeding, summaries."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from models.errors import ModelConfigError
from stages.engine.distributed import is_main_process
from stages.engine.files import atomic_write_text
from stages.errors import UserError

log = logging.getLogger("detpipe")


def instantiate_or_user_error(config: Any, config_key: Callable[[str], str] | None = None, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, letting a UserError raised by a constructor through as itself (Hydra wraps
    every constructor error in a multi-line InstantiationException). With `config_key` (constructor argument ->
    config key), a model's ModelConfigError becomes the one-line UserError `<config key>: <problem>`."""
    try:
        return instantiate(config, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        if config_key is not None and isinstance(cause, ModelConfigError):
            raise UserError(f"{config_key(cause.argument)}: {cause.problem}") from None
        raise


def stage_dir(cfg: DictConfig, name: str | None = None) -> Path:
    """The only place a stage writes: `paths.stage_dir` when set (the pipeline points it into the stage store),
    else <run_dir>/<stage>."""
    chosen = cfg.paths.get("stage_dir") if name is None else None
    path = Path(str(chosen)) if chosen else Path(cfg.paths.run_dir) / (name or cfg.stage.name)
    path.mkdir(parents=True, exist_ok=True)
    return path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def get_rng_state() -> dict:
    """This process's random generators (python, numpy, torch, CUDA) as plain containers and tensors, so that a
    checkpoint holding them still loads with weights_only=True."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restore what `get_rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
