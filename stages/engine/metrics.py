"""Where numbers go: the console, <stage_dir>/metrics.jsonl and, when enabled, Weights & Biases."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from stages.engine.checkpoint import atomic_write_text
from stages.engine.distributed import is_main_process

log = logging.getLogger("detpipe")


def swept_name(cfg: DictConfig) -> str | None:
    """A W&B run name from the command-line overrides of this job (e.g. `num_aux_heads=2,fraction=0.1`)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not inside a Hydra app (tests, pipeline sub-stages composed by hand)
        return None
    parts = [o.split(".")[-1] for o in overrides if "=" in o and not o.startswith(("paths.", "hydra"))]
    return ",".join(parts) or None


class MetricsLogger:
    """Logs scalar dicts per step; only the main process writes. `metrics.jsonl` holds one JSON object per call."""

    def __init__(self, stage_dir: Path, stage: str, cfg: DictConfig, resume_iter: int | None = None):
        self.stage_dir = Path(stage_dir)
        self.stage = stage
        self.path = self.stage_dir / "metrics.jsonl"
        self.enabled = is_main_process()
        self.wandb = None
        if not self.enabled:
            return
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_iter)
        if cfg.logger.get("wandb", False):
            self.wandb = self._init_wandb(cfg)

    def _truncate_after(self, resume_iter: int | None) -> None:
        """On resume, drop logged steps the checkpoint does not contain, so the file reads as one run."""
        if not self.path.exists():
            return
        if resume_iter is None:
            self.path.unlink()
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("iter", 0) <= resume_iter
        ]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def _init_wandb(self, cfg: DictConfig):
        import wandb

        run_dir = Path(cfg.paths.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        group = cfg.logger.get("group")
        if not group:
            # Sweep jobs live in <sweep_dir>/<job number>: they share the sweep's group. A single run is its own.
            group = f"{run_dir.parent.parent.name}/{run_dir.parent.name}" if run_dir.name.isdigit() else run_dir.name
        return wandb.init(
            project=cfg.logger.project,
            entity=cfg.logger.get("entity"),
            group=group,
            job_type=self.stage,
            name=swept_name(cfg) or f"{self.stage}-{run_dir.name}",
            tags=list(cfg.logger.get("tags", [])),
            config=OmegaConf.to_container(cfg, resolve=True),
            dir=str(run_dir),
            mode=cfg.logger.get("mode", "offline"),
            reinit="finish_previous",
        )

    def log(self, step: int, values: dict[str, Any], console: bool = True) -> None:
        if not self.enabled:
            return
        record = {"iter": step, **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if console:
            shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
            log.info("[%s] iter %d %s", self.stage, step, shown)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb is not None:
            for k, v in values.items():
                self.wandb.summary[k] = v

    def log_images(self, key: str, images: list, step: int | None = None) -> None:
        if self.wandb is not None and images:
            self.wandb.log({key: images}, step=step)

    def log_artifact(self, path: Path, name: str, kind: str = "model") -> None:
        if self.wandb is not None:
            import wandb

            artifact = wandb.Artifact(name=name, type=kind)
            artifact.add_file(str(path))
            self.wandb.log_artifact(artifact)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
