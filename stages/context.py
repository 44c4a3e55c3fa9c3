"""The scaffolding every stage shares, in one place: `open_stage(cfg)` starts the timer, joins the process group,
seeds, makes the output directory, removes temporary files a killed run left behind, and fingerprints the stage;
the returned `StageContext` loads `init_from` (unless resuming), writes the final checkpoint and the summary.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from stages.common import read_json, read_summary, seed_everything, stage_dir, write_json
from stages.engine.checkpoint import CHECKPOINT_NAME, LAST_NAME, checkpoint_payload, load_into, save_checkpoint
from stages.engine.distributed import barrier, init_distributed, is_distributed, is_main_process
from stages.engine.files import TEMP_SUFFIX
from stages.engine.metrics import MetricsLogger
from stages.engine.optim import build_optimizer, build_scheduler
from stages.engine.trainer import (
    CallbackHook,
    CheckpointHook,
    ForwardFn,
    Hook,
    LogHook,
    Trainer,
    compile_modules,
    detection_forward,
    iterations,
    unwrap,
    wrap_model,
)
from stages.errors import UserError
from stages.fingerprint import FINGERPRINT_FILE, FINGERPRINTED, Fingerprint, read_fingerprint, stage_fingerprint

log = logging.getLogger("detpipe")
# The init_from load report, kept so that a resumed run still reports what it started from.
INIT_REPORT = "init.json"
# How many differing keys a refusal names before it says "and N more".
SHOWN_DIFFERENCES = 8


@dataclass
class StageContext:
    """One stage's run: its config, output directory, device and fingerprint."""

    cfg: DictConfig
    out: Path
    device: torch.device
    fingerprint: Fingerprint | None
    start: float = field(default_factory=time.perf_counter)

    @property
    def name(self) -> str:
        return str(self.cfg.stage.name)

    @property
    def resuming(self) -> bool:
        """Whether a killed run of this stage left last.pth to continue from."""
        return (self.out / LAST_NAME).exists()

    def finished(self) -> dict | None:
        """The summary of this stage's finished run in `out` (same fingerprint: `open_stage` checked), or None."""
        summary = read_summary(self.out)
        if summary is None or not (self.out / CHECKPOINT_NAME).is_file():
            return None
        log.info("[%s] already finished in %s (fingerprint %s); not trained again", self.name, self.out, self.short)
        return summary

    @property
    def short(self) -> str | None:
        return self.fingerprint.short if self.fingerprint else None

    def load_init(self, model: nn.Module, drop: Iterable[str] = ()) -> dict | None:
        """Load `stage.init_from` into `model`, unless resuming (last.pth then supplies the weights); the load
        report, also kept in init.json so that a resumed run reports it too."""
        source = self.cfg.stage.get("init_from")
        if self.resuming or not source:
            return read_json(self.out / INIT_REPORT)
        report = load_into(model, source, drop=drop)
        log.info("%s", report.table())
        write_json(self.out / INIT_REPORT, report.as_dict())
        return report.as_dict()

    def payload(self, state: dict, categories: list[dict] | None = None) -> dict:
        """A checkpoint of this stage (config, fingerprint) around `state`: {"model", "iter", ...extra}."""
        state = dict(state)
        return checkpoint_payload(
            state.pop("model"),
            stage=self.name,
            iteration=state.pop("iter"),
            config=OmegaConf.to_container(self.cfg, resolve=True),
            fingerprint=self.fingerprint.digest if self.fingerprint else None,
            categories=categories,
            **state,
        )

    def save_final(
        self, state: dict[str, torch.Tensor], iteration: int, categories: list[dict] | None = None, **extra
    ) -> Path:
        """checkpoint.pth: the weights later stages load (the whole model, or a key-filtered part of it), with the
        stage, iteration, config, fingerprint and, for a trained class head, the categories it predicts."""
        path = self.out / CHECKPOINT_NAME
        if is_main_process():
            save_checkpoint(path, self.payload({"model": state, "iter": iteration, **extra}, categories))
        barrier()
        return path

    def trainer(
        self,
        model: nn.Module,
        loader: DataLoader,
        forward_fn: ForwardFn = detection_forward,
        hooks: Sequence[Hook] = (),
        final: Callable[[Trainer], object] | None = None,
        categories: list[dict] | None = None,
    ) -> Trainer:
        """The stage's Trainer from `trainer.*`, resumed from last.pth when the directory holds one: optimizer and
        schedule, DDP, and the hooks in their order: the stage's own `hooks` (which change the model, e.g. a
        momentum update), `final` (the stage's checkpoint.pth, written before the LogHook closes the W&B run that
        may upload it), LogHook, then CheckpointHook (last.pth, written once the step's logging state is
        complete)."""
        tcfg = self.cfg.trainer
        max_iters = iterations(tcfg.max_iters, tcfg.epochs, len(loader))
        if tcfg.compile:
            log.info("[%s] torch.compile: %s", self.name, compile_modules(model, list(tcfg.compile_modules)))
        model = wrap_model(model, self.device, is_distributed())
        optimizer = build_optimizer(unwrap(model), tcfg.optimizer)
        scheduler = build_scheduler(optimizer, max_iters, tcfg.scheduler)
        checkpoint = CheckpointHook(
            self.out / LAST_NAME,
            tcfg.checkpoint_every,
            payload=lambda state: self.payload(state, categories),
            fingerprint=self.fingerprint.digest if self.fingerprint else None,
        )
        log_hook = LogHook(
            tcfg.log_every, lambda resume_iter: MetricsLogger(self.out, self.name, self.cfg, resume_iter=resume_iter)
        )
        final_hooks = [CallbackHook(final)] if final is not None else []
        trainer = Trainer(
            model,
            loader,
            optimizer,
            scheduler,
            max_iters,
            self.device,
            forward_fn=forward_fn,
            hooks=[*hooks, *final_hooks, log_hook, checkpoint],
            clip_grad_norm=tcfg.clip_grad_norm,
            amp_dtype=tcfg.amp_dtype,
            name=self.name,
        )
        checkpoint.resume(trainer)
        return trainer

    def write_summary(self, summary: dict) -> dict:
        """summary.json with the stage name, fingerprint and total seconds added. Written last: with
        checkpoint.pth beside it, its presence marks the stage finished."""
        summary = {
            "stage": self.name,
            **summary,
            "fingerprint": self.fingerprint.digest if self.fingerprint else None,
            "seconds": time.perf_counter() - self.start,
        }
        write_json(self.out / "summary.json", summary)
        return summary


def remove_temporary_files(directory: Path) -> None:
    """Temporary files of atomic writes a killed run left behind (never renamed into place)."""
    for path in Path(directory).glob(f".*{TEMP_SUFFIX}"):
        log.warning("removing %s, left behind by an interrupted write", path)
        path.unlink(missing_ok=True)


def check_resumable(out: Path, fingerprint: Fingerprint) -> None:
    """A stage directory holding a run (last.pth, or a finished checkpoint) is continued or reused only under the
    same fingerprint; otherwise one line names the keys that differ."""
    holds_run = (out / LAST_NAME).exists() or (out / CHECKPOINT_NAME).exists()
    if not holds_run:
        return
    recorded = read_fingerprint(out)
    if recorded is None:
        raise UserError(
            f"{out}: holds a run without {FINGERPRINT_FILE} (written by an older version), so it cannot be "
            "resumed safely; expected a new run directory (hydra.run.dir=...) or this one emptied"
        )
    if recorded.digest == fingerprint.digest:
        return
    differences = recorded.differences(fingerprint)
    shown = ", ".join(differences[:SHOWN_DIFFERENCES]) or "none by name (the fingerprint rule changed)"
    more = f" and {len(differences) - SHOWN_DIFFERENCES} more" if len(differences) > SHOWN_DIFFERENCES else ""
    raise UserError(
        f"{out}: holds a run of {fingerprint.stage} with other settings (fingerprint {recorded.short}, now "
        f"{fingerprint.short}; differing: {shown}{more}); expected the same settings to resume it: use a new run "
        "directory (hydra.run.dir=...) or remove this one"
    )


def open_stage(cfg: DictConfig) -> StageContext:
    """Start a stage: timer, process group, seed, output directory, leftover temporary files, fingerprint (and
    the resume check against the one recorded in the directory). Every stage's `run` begins here."""
    start = time.perf_counter()
    device = init_distributed(cfg.trainer.device, cfg.trainer.dist_backend)
    seed_everything(cfg.seed)
    out = stage_dir(cfg)
    fingerprint = None
    if cfg.stage.name in FINGERPRINTED:
        fingerprint = stage_fingerprint(cfg)
        if cfg.stage.name != "eval":  # eval keeps no training state: it is simply done again
            check_resumable(out, fingerprint)
    if is_main_process():
        remove_temporary_files(out)
        if fingerprint is not None:
            write_json(out / FINGERPRINT_FILE, fingerprint.as_dict())
    # No barrier here: under DDP the eval stage that finetune runs at its end runs on rank 0 alone.
    if fingerprint is not None:
        log.info("[%s] fingerprint %s, output %s", cfg.stage.name, fingerprint.short, out)
    return StageContext(cfg, out, device, fingerprint, start)
