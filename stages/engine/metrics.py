"""Where numbers go: the console, <stage_dir>/metrics.jsonl and, when enabled, Weights & Biases.

`wandb` is imported only when `cfg.logger.wandb` is true: with the logger off no W&B code runs at all.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from stages.engine.checkpoint import CHECKPOINT_NAME
from stages.engine.distributed import is_main_process
from stages.engine.files import atomic_write_text

log = logging.getLogger("detpipe")
# W&B's default server, used to look up a `wandb login` key in ~/.netrc when WANDB_BASE_URL is unset.
DEFAULT_WANDB_HOST = "https://api.wandb.ai"


def _hydra_config():
    """This job's Hydra config, or None outside a Hydra app (tests, configs composed by hand)."""
    try:
        return HydraConfig.get()
    except ValueError:
        return None


def _is_multirun(hydra_cfg) -> bool:
    return hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN


def run_group(cfg: DictConfig) -> str:
    """The W&B group: `logger.group` when set, else the sweep directory for every job of a multirun and the run
    directory otherwise (so a pipeline's stages share it), as its last two path parts
    (`multirun/2024-05-01/12-00-00` -> `2024-05-01/12-00-00`)."""
    if cfg.logger.get("group"):
        return str(cfg.logger.group)
    hydra_cfg = _hydra_config()
    directory = hydra_cfg.sweep.dir if _is_multirun(hydra_cfg) else cfg.paths.run_dir
    return "/".join(Path(str(directory)).resolve().parts[-2:])


def swept_keys(sweep_dir: Path) -> list[str]:
    """The keys a Hydra multirun sweeps (`model.num_aux_heads=0,1,2` -> `model.num_aux_heads`), read from the
    `multirun.yaml` Hydra's basic sweeper writes into the sweep directory; [] when it is absent."""
    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        return []
    overrides = OverridesParser.create().parse_overrides(list(OmegaConf.load(path).hydra.overrides.task))
    return [o.get_key_element() for o in overrides if o.is_sweep_override()]


def run_name(cfg: DictConfig, stage: str) -> str:
    """The W&B run name: `logger.run_name` when set; a sweep job's swept values (`num_aux_heads=2,fraction=0.1`);
    otherwise the job's command-line overrides, leaving out `logger.*` and paths (`paths.*` and values holding a
    '/'), which make names unreadable and sit in the config anyway; `<stage>-<run dir name>` when nothing is left."""
    if cfg.logger.get("run_name"):
        return str(cfg.logger.run_name)
    hydra_cfg = _hydra_config()
    task = list(hydra_cfg.overrides.task) if hydra_cfg is not None else []
    values = dict(o.split("=", 1) for o in task if "=" in o)
    keys = swept_keys(Path(hydra_cfg.sweep.dir)) if _is_multirun(hydra_cfg) else []
    if not keys:
        left_out = ("paths.", "hydra.", "logger")
        keys = [k for k, v in values.items() if not k.lstrip("+~").startswith(left_out) and "/" not in v]
    parts = [f"{key.split('.')[-1]}={values[key]}" for key in keys if key in values]
    return ",".join(parts) or f"{stage}-{Path(str(cfg.paths.run_dir)).name}"


def has_wandb_key() -> bool:
    """Whether W&B can authenticate without asking: WANDB_API_KEY, or a `wandb login` entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", DEFAULT_WANDB_HOST)).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(mode: str | None) -> str:
    """`logger.mode` when set (WANDB_MODE sets it), else online when a key is configured and offline otherwise."""
    if mode:
        return str(mode)
    return "online" if has_wandb_key() else "offline"


class MetricsLogger:
    """Logs scalar dicts per step; only the main process writes. `metrics.jsonl` holds one JSON object per call.

    With `cfg.logger.wandb`, the same values go to a W&B run (one per stage: job_type = the stage) whose files
    live in `<run_dir>/wandb/`. `close()` finishes it, first uploading `<stage_dir>/checkpoint.pth` as a model
    artifact when `logger.log_checkpoints` is true and that file exists (training stages write it just before).
    """

    def __init__(self, stage_dir: Path, stage: str, cfg: DictConfig, resume_iter: int | None = None):
        self.stage_dir = Path(stage_dir)
        self.stage = stage
        self.path = self.stage_dir / "metrics.jsonl"
        self.enabled = is_main_process()
        self.log_checkpoints = bool(cfg.logger.get("log_checkpoints", False))
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
        kept = []
        for number, line in enumerate(self.path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                # A run killed while appending leaves its last line torn.
                log.warning("%s: line %d is not valid JSON (a write cut short); dropped", self.path, number)
                continue
            if record.get("iter", 0) <= resume_iter:
                kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def _init_wandb(self, cfg: DictConfig):
        import wandb

        run_dir = Path(str(cfg.paths.run_dir))
        run_dir.mkdir(parents=True, exist_ok=True)
        mode = wandb_mode(cfg.logger.get("mode"))
        run = wandb.init(
            project=cfg.logger.project,
            entity=cfg.logger.get("entity"),
            group=run_group(cfg),
            job_type=self.stage,
            name=run_name(cfg, self.stage),
            tags=[str(t) for t in cfg.logger.get("tags", [])],
            config=OmegaConf.to_container(cfg, resolve=True),
            dir=str(run_dir),
            mode=mode,
            reinit="finish_previous",
            settings=wandb.Settings(console=cfg.logger.get("console", "auto")),
        )
        if mode == "offline":
            sync_dir = Path(run.dir).parent  # run.dir is the run's files/ folder
            log.info("[%s] W&B offline run in %s; upload it with `wandb sync %s`", self.stage, sync_dir, sync_dir)
        return run

    def log(self, step: int, values: dict[str, Any], console: bool = True) -> None:
        """Append `values` at `step`. Keys are logged as they are: W&B groups panels by the part before the first
        '/' (`detr/loss_cls`, `aux0_atss/loss_cls`, `eval/AP`)."""
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
        """Final values of the run (W&B's run table and sweep views read these)."""
        if self.wandb is not None:
            self.wandb.summary.update(values)

    def log_images(self, images: dict[str, Any], step: int | None = None) -> None:
        """{key: wandb.Image}, one panel per key: W&B shows a list of images of different sizes distorted.
        Callers build the images only when `self.wandb` is set."""
        if self.wandb is not None and images:
            self.wandb.log(images, step=step)

    def log_artifact(self, path: Path, name: str, kind: str = "model", metadata: dict | None = None) -> None:
        """Upload one file as a W&B artifact. `immutable`: W&B reads the file in place instead of copying it into
        its staging cache, so the file must not change afterwards (checkpoint.pth is final)."""
        if self.wandb is not None:
            import wandb

            artifact = wandb.Artifact(name=re.sub(r"[^\w.-]", "_", name), type=kind, metadata=metadata)
            artifact.add_file(str(path), policy="immutable")
            self.wandb.log_artifact(artifact, aliases=["latest", "final"])

    def close(self) -> None:
        """Finish the W&B run; with `logger.log_checkpoints`, upload the stage's final checkpoint first."""
        if self.wandb is None:
            return
        checkpoint = self.stage_dir / CHECKPOINT_NAME
        if self.log_checkpoints and checkpoint.is_file():
            self.log_artifact(checkpoint, f"{self.stage}-{self.wandb.id}", metadata={"path": str(checkpoint)})
        self.wandb.finish()
        self.wandb = None
