"""pipeline: the stages of `stage.stages` in order, each starting from the previous stage's checkpoint.

Training stages are computed into (or reused from) the stage store by fingerprint (stages/store.py) and linked
into the run directory; pipeline.json says per stage whether it was computed or reused."""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig, open_dict

from stages import STAGE_MODULES, get_stage
from stages.common import read_summary, write_json
from stages.engine.checkpoint import sha256_of
from stages.engine.distributed import broadcast_object, init_distributed, is_main_process
from stages.errors import UserError
from stages.fingerprint import FINGERPRINTED, Fingerprint, read_fingerprint, stage_fingerprint
from stages.store import STORED_STAGES, entry_dir, entry_lock, is_finished, link_into_run

log = logging.getLogger("detpipe")
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# pipeline.json: how each stage was obtained.
COMPUTED, REUSED = "computed", "reused"


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
    """Run `stage.stages` in order, each from the previous training stage's checkpoint. Training stages go through
    the stage store (computed, or reused when their fingerprint is there already) and are linked into the run
    directory; eval runs in the run directory. pipeline.json records each stage as it finishes."""
    per_stage = cfg.stage.get("overrides") or {}
    # Overrides for a known stage this pipeline skips are ignored (the defaults name image_pretrain, which a
    # shorter stage.stages may leave out); an unknown name is a typo.
    unknown = sorted(set(per_stage) - set(STAGE_MODULES))
    if unknown:
        raise UserError(f"stage.overrides: unknown stage(s) {unknown}; expected names from {sorted(STAGE_MODULES)}")
    run_dir = Path(cfg.paths.run_dir).resolve()
    store_dir = Path(str(cfg.paths.store_dir)).resolve()
    overrides = job_overrides()
    # A pipeline-level stage.init_from seeds the first stage (e.g. an imported backbone).
    previous = cfg.stage.get("init_from")
    record = {"run_dir": str(run_dir), "store_dir": str(store_dir), "stages": []}
    # Joined before the first stage, so that rank 0's store decisions can be shared with the other ranks.
    init_distributed(cfg.trainer.device, cfg.trainer.dist_backend)
    for name in cfg.stage.stages:
        log.info("[pipeline] stage %d/%d: %s", len(record["stages"]) + 1, len(cfg.stage.stages), name)
        stage_cfg = compose_stage(name, overrides, str(run_dir), previous, [str(o) for o in per_stage.get(name) or []])
        with open_dict(stage_cfg):
            stage_cfg.seed = cfg.seed
            if name == "finetune":
                # A stored finetune is shared between runs; each run evaluates in its own eval stage.
                stage_cfg.stage.evaluate = False
        start = time.perf_counter()
        fingerprint = stage_fingerprint(stage_cfg) if name in FINGERPRINTED else None
        if name in STORED_STAGES:
            directory = entry_dir(store_dir, fingerprint)
            summary, status = stored_stage(name, stage_cfg, fingerprint, directory)
            if is_main_process():
                link_into_run(run_dir, name, directory)
        else:
            directory = run_dir / name
            summary, status = run_dir_stage(name, stage_cfg, fingerprint, directory)
        checkpoint = summary.get("checkpoint") if name in STORED_STAGES else None
        seconds = time.perf_counter() - start if status == COMPUTED else summary.get("seconds", 0.0)
        record["stages"].append(
            {
                "name": name,
                "status": status,
                "fingerprint": fingerprint.digest if fingerprint else None,
                "directory": str(directory),
                "checkpoint": checkpoint,
                "sha256": sha256_of(Path(checkpoint)) if checkpoint and is_main_process() else None,
                "seconds": round(seconds, 2),
                "metrics": summary.get("metrics", {}),
            }
        )
        write_json(run_dir / "pipeline.json", record)
        if checkpoint:
            previous = str(directory)
    return record


def stored_stage(name: str, stage_cfg: DictConfig, fingerprint: Fingerprint, entry: Path) -> tuple[dict, str]:
    """(summary, status) of a training stage through the store: reused when its entry is finished, else computed
    into the entry (resuming a killed attempt there). Rank 0 holds the entry's lock and decides for every rank."""
    with entry_lock(entry) if is_main_process() else nullcontext():
        finished = broadcast_object(is_finished(entry, fingerprint) if is_main_process() else None)
        if finished:
            log.info("[pipeline] %s: reusing %s (fingerprint %s)", name, entry, fingerprint.short)
            return read_summary(entry), REUSED
        with open_dict(stage_cfg):
            stage_cfg.paths.stage_dir = str(entry)
        return get_stage(name)(stage_cfg), COMPUTED


def run_dir_stage(name: str, stage_cfg: DictConfig, fingerprint: Fingerprint | None, out: Path) -> tuple[dict, str]:
    """(summary, status) of a stage kept in the run directory (eval): reused when its recorded fingerprint is the
    same and it finished, else computed again."""
    recorded = read_fingerprint(out)
    done = read_summary(out)
    if fingerprint is not None and recorded is not None and recorded.digest == fingerprint.digest and done:
        log.info("[pipeline] %s: reusing %s (fingerprint %s)", name, out, fingerprint.short)
        return done, REUSED
    return get_stage(name)(stage_cfg), COMPUTED
