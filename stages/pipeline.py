"""pipeline: the stages of `stage.stages` in order, each starting from the previous stage's checkpoint."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig, open_dict

from stages import STAGE_MODULES, get_stage
from stages.common import read_summary, write_json
from stages.engine.checkpoint import sha256_of
from stages.errors import UserError

log = logging.getLogger("detpipe")
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def job_overrides() -> list[str]:
    """The command-line overrides of this job (empty outside a Hydra app)."""
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def compose_stage(
    name: str, overrides: list[str], run_dir: str, init_from: str | None, stage_overrides: list[str] | None = None
) -> DictConfig:
    """The config `python run.py stage=<name> <overrides> <stage_overrides>` would get, writing into this run
    directory. The job's own `stage...` overrides belong to the pipeline and are left out; `stage_overrides` are
    this stage's (the pipeline's `stage.overrides.<name>`)."""
    keep = [o for o in overrides if not o.lstrip("+~").startswith("stage")]
    extra = [f"stage={name}", f"paths.run_dir={run_dir}"]
    if init_from is not None:
        extra.append(f"stage.init_from={init_from}")
    extra.extend(stage_overrides or [])
    try:
        if GlobalHydra.instance().is_initialized():
            return compose(config_name="config", overrides=keep + extra)
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=keep + extra)
    except HydraException as err:
        # The job's own overrides were checked at start-up, so a failure comes from this stage's overrides, or
        # from composing the stage itself (e.g. finetune's evaluation) when it has none.
        message = " ".join(str(err).split())
        where = f"stage.overrides.{name}: {stage_overrides}" if stage_overrides else f"stage {name}"
        raise UserError(f"{where}: {message}") from None


def run(cfg: DictConfig) -> dict:
    run_dir = str(Path(cfg.paths.run_dir).resolve())
    overrides = job_overrides()
    # A pipeline-level stage.init_from seeds the first stage (e.g. an imported backbone).
    previous = cfg.stage.get("init_from")
    record = {"run_dir": run_dir, "stages": []}
    per_stage = cfg.stage.get("overrides") or {}
    # Overrides for a known stage this pipeline skips are ignored (the defaults name image_pretrain, which a
    # shorter stage.stages may leave out); an unknown name is a typo.
    unknown = sorted(set(per_stage) - set(STAGE_MODULES))
    if unknown:
        raise UserError(f"stage.overrides: unknown stage(s) {unknown}; expected names from {sorted(STAGE_MODULES)}")
    for name in cfg.stage.stages:
        stage_cfg = compose_stage(name, overrides, run_dir, previous, [str(o) for o in per_stage.get(name) or []])
        with open_dict(stage_cfg):
            stage_cfg.seed = cfg.seed
            if name == "finetune" and "eval" in cfg.stage.stages:
                # The pipeline's own eval stage evaluates; finetune need not do it twice.
                stage_cfg.stage.evaluate = False
        out = Path(run_dir) / name
        done = read_summary(out)
        start = time.perf_counter()
        if done is not None:
            log.info("[pipeline] %s already finished in %s; reusing it", name, out)
            summary, status = done, "reused"
        else:
            log.info("[pipeline] stage %d/%d: %s", len(record["stages"]) + 1, len(cfg.stage.stages), name)
            summary, status = get_stage(name)(stage_cfg), "done"
        checkpoint = summary.get("checkpoint") if name != "eval" else None
        record["stages"].append(
            {
                "name": name,
                "status": status,
                "checkpoint": checkpoint,
                "sha256": sha256_of(Path(checkpoint)) if checkpoint else None,
                "seconds": round(time.perf_counter() - start if status == "done" else summary.get("seconds", 0.0), 2),
                "metrics": summary.get("metrics", {}),
            }
        )
        write_json(Path(run_dir) / "pipeline.json", record)
        if checkpoint:
            previous = str(out)
    return record
