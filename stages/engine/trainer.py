"""The one training loop, shared by every training stage (image_pretrain, box_pretrain, finetune).

`Trainer.run_step` does one optimisation step; periodic work (logging, checkpoints, EMA updates) hangs on
hooks called after each step, so the loop itself never branches on what a stage needs.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from stages.common import get_rng_state, set_rng_state
from stages.data.build import EpochSampler
from stages.engine.checkpoint import LAST_NAME, checkpoint_payload, read_checkpoint, save_checkpoint
from stages.engine.distributed import all_gather_object, all_reduce_mean, barrier, is_distributed, is_main_process, rank
from stages.engine.metrics import MetricsLogger
from stages.engine.optim import build_optimizer, build_scheduler
from stages.errors import UserError

log = logging.getLogger("detpipe")

LossDict = dict[str, torch.Tensor]
# forward_fn(model, batch, device) -> losses. Keys whose last '/'-part starts with "loss" are summed into the
# objective; other keys (statistics such as an accuracy) are only logged.
ForwardFn = Callable[[nn.Module, object, torch.device], LossDict]


def to_device(obj, device: torch.device):
    """Move tensors inside lists/tuples/dicts to `device`."""
    if torch.is_tensor(obj):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def detection_forward(model: nn.Module, batch, device: torch.device) -> LossDict:
    """A detection batch (images, targets) through a torchvision-style meta-architecture."""
    images, targets = to_device(batch, device)
    return model(images, targets)


def is_loss(key: str) -> bool:
    return key.rsplit("/", 1)[-1].startswith("loss")


def total_loss(losses: LossDict) -> torch.Tensor:
    """The objective; a non-finite term stops training with its name rather than corrupting the weights."""
    terms = {k: v for k, v in losses.items() if is_loss(k)}
    bad = [k for k, v in terms.items() if not torch.isfinite(v).all()]
    if bad:
        raise FloatingPointError(f"non-finite loss term(s) {bad} (values {[float(terms[k].detach()) for k in bad]})")
    return sum(terms.values())


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


class Hook:
    """Periodic work attached to the loop. `after_step` runs after every optimisation step. A hook that keeps
    state across steps returns it from `state_dict` so that last.pth carries it and a resumed run continues it."""

    def after_step(self, trainer: Trainer) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Trainer:
    """Trains `model` on `loader` for `max_iters` steps, resuming from `<stage_dir>/last.pth` when present.

    last.pth holds the whole training state: weights, optimizer, schedule, gradient scaler, iteration, every
    hook's state and every rank's random generators, plus the stage fingerprint. With an `EpochSampler` loader a
    resumed run continues mid-epoch at the next unread batch, so on CPU with `num_workers=0` it logs the same
    losses at the same iterations as a run never killed. A last.pth of another fingerprint is refused."""

    def __init__(
        self,
        cfg: DictConfig,
        model: nn.Module,
        loader: DataLoader,
        stage_dir: Path,
        stage: str,
        device: torch.device,
        forward_fn: ForwardFn = detection_forward,
        hooks: list[Hook] | None = None,
        fingerprint: str | None = None,
        categories: list[dict] | None = None,
    ):
        self.cfg = cfg
        self.tcfg = cfg.trainer
        self.stage = stage
        self.stage_dir = Path(stage_dir)
        self.device = device
        self.loader = loader
        # Each epoch's shuffle is seeded from the loader's own seed (rank-specific under DDP) and the epoch.
        self.loader_seed = loader.generator.initial_seed() if getattr(loader, "generator", None) is not None else None
        self.forward_fn = forward_fn
        self.fingerprint = fingerprint
        self.categories = categories
        self.hooks = [LogHook(self.tcfg.log_every), CheckpointHook(self.tcfg.checkpoint_every), *(hooks or [])]
        self.max_iters = self.tcfg.max_iters if self.tcfg.epochs is None else self.tcfg.epochs * len(loader)
        if self.max_iters < 1 and self.tcfg.epochs is not None:
            raise UserError(
                f"trainer.epochs: {self.tcfg.epochs} x {len(loader)} batches per epoch gives {self.max_iters} "
                "iterations; expected at least 1"
            )
        if self.max_iters < 1:
            raise UserError(f"trainer.max_iters: {self.max_iters}; expected at least 1")
        model.to(device)
        self.optimizer = build_optimizer(model, self.tcfg.optimizer)
        self.scheduler = build_scheduler(self.optimizer, self.max_iters, self.tcfg.scheduler)
        self.amp = bool(self.tcfg.amp) and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        if is_distributed():
            ids = [device.index] if device.type == "cuda" else None
            # Auxiliary heads may leave parameters without gradient in a step (e.g. no positives).
            model = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
        self.model = model
        self.iter = 0
        self.epoch = 0
        self.last_losses: dict[str, float] = {}
        self.logger: MetricsLogger | None = None

    # --- checkpoints -------------------------------------------------------------------------------------
    def state(self, rng_states: list[dict]) -> dict:
        """The full training state (last.pth); `rng_states` holds every rank's generators, in rank order."""
        return checkpoint_payload(
            unwrap(self.model).state_dict(),
            stage=self.stage,
            iteration=self.iter,
            config=OmegaConf.to_container(self.cfg, resolve=True),
            fingerprint=self.fingerprint,
            categories=self.categories,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            hooks=[hook.state_dict() for hook in self.hooks],
            rng=rng_states,
        )

    def save(self, name: str) -> Path:
        path = self.stage_dir / name
        rng_states = all_gather_object(get_rng_state())
        if is_main_process():
            save_checkpoint(path, self.state(rng_states))
        barrier()
        return path

    def resume(self) -> bool:
        """Continue from last.pth: weights, optimizer, schedule, scaler, iteration, hook states and this rank's
        random generators. A last.pth written under another fingerprint is refused."""
        path = self.stage_dir / LAST_NAME
        if not path.exists():
            return False
        payload = read_checkpoint(path)
        if payload.get("fingerprint") != self.fingerprint:
            raise UserError(
                f"{path}: written by a run with fingerprint {payload.get('fingerprint')}, not this run's "
                f"{self.fingerprint}; expected the same settings to resume it"
            )
        unwrap(self.model).load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.scaler.load_state_dict(payload["scaler"])
        for hook, state in zip(self.hooks, payload.get("hooks", [])):
            hook.load_state_dict(state)
        rng_states = payload.get("rng") or []
        if rank() < len(rng_states):
            set_rng_state(rng_states[rank()])
        self.iter = int(payload["iter"])
        log.info("[%s] resumed from %s at iteration %d", self.stage, path, self.iter)
        return True

    # --- the loop ----------------------------------------------------------------------------------------
    def batches(self) -> Iterator:
        """Batches from where `self.iter` stands: its epoch and, with an EpochSampler, its batch within it."""
        self.epoch, done = divmod(self.iter, len(self.loader))
        while True:
            if isinstance(self.loader.sampler, EpochSampler):
                self.loader.sampler.set_epoch(self.epoch, start=done * self.loader.batch_size)
            if self.loader_seed is not None:
                self.loader.generator.manual_seed(self.loader_seed + self.epoch)
            yield from self.loader
            self.epoch, done = self.epoch + 1, 0

    def run_step(self, batch) -> LossDict:
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.amp else nullcontext()
        with autocast:
            losses = self.forward_fn(self.model, batch, self.device)
        loss = total_loss(losses)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.tcfg.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tcfg.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        losses["loss"] = loss
        return losses

    def train(self) -> dict:
        """Run to max_iters; returns the iteration and the last logged losses. Writes last.pth periodically and at
        the end; the stage then writes its checkpoint.pth (`save(CHECKPOINT_NAME)` for the full training state,
        or a key-filtered part of the model through its StageContext)."""
        self.model.train()
        resumed = self.resume()
        self.logger = MetricsLogger(self.stage_dir, self.stage, self.cfg, resume_iter=self.iter if resumed else None)
        data = self.batches()
        bar = tqdm(
            total=self.max_iters,
            initial=self.iter,
            desc=self.stage,
            disable=not is_main_process(),
            dynamic_ncols=True,
        )
        start = time.perf_counter()
        while self.iter < self.max_iters:
            t0 = time.perf_counter()
            losses = self.run_step(next(data))
            self.iter += 1
            self.step_seconds = time.perf_counter() - t0
            self.last_losses = {k: float(v.detach()) for k, v in losses.items()}
            for hook in self.hooks:
                hook.after_step(self)
            bar.update(1)
            bar.set_postfix(loss=f"{self.last_losses['loss']:.3f}")
        bar.close()
        self.train_seconds = time.perf_counter() - start
        self.save(LAST_NAME)
        return {"iter": self.iter, "final_losses": self.last_losses}

    def close(self) -> None:
        """Finish the metrics logger (and its W&B run, uploading checkpoint.pth when `logger.log_checkpoints`):
        called by the stage once its checkpoint.pth is written."""
        if self.logger is not None:
            self.logger.close()

    def lr(self) -> float:
        """The base learning rate (the group with multiplier 1, else the first)."""
        groups = self.optimizer.param_groups
        group = next((g for g in groups if g.get("lr_mult", 1.0) == 1.0), groups[0])
        return group["lr"]


class LogHook(Hook):
    """Every `every` steps: mean of each loss term over the interval, lr, seconds per iteration and ETA."""

    def __init__(self, every: int):
        self.every = max(1, int(every))
        self.sums: dict[str, float] = {}
        self.count = 0
        self.seconds = 0.0

    def after_step(self, trainer: Trainer) -> None:
        for k, v in trainer.last_losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1
        self.seconds += trainer.step_seconds
        if trainer.iter % self.every and trainer.iter != trainer.max_iters:
            return
        means = all_reduce_mean({k: v / self.count for k, v in self.sums.items()})
        sec = self.seconds / self.count
        eta = sec * (trainer.max_iters - trainer.iter)
        values = {**means, "lr": trainer.lr(), "sec_per_iter": sec, "eta_min": eta / 60}
        values = {k: (v if math.isfinite(v) else str(v)) for k, v in values.items()}
        trainer.logger.log(trainer.iter, values)
        self.sums, self.count, self.seconds = {}, 0, 0.0

    def state_dict(self) -> dict:
        # The running sums of the interval in progress, so a resumed run logs the same means.
        return {"sums": dict(self.sums), "count": self.count, "seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        self.sums, self.count, self.seconds = dict(state["sums"]), int(state["count"]), float(state["seconds"])


class CheckpointHook(Hook):
    """Every `every` steps: last.pth, for resuming a killed run with the same command."""

    def __init__(self, every: int):
        self.every = max(1, int(every))

    def after_step(self, trainer: Trainer) -> None:
        if trainer.iter % self.every == 0 and trainer.iter < trainer.max_iters:
            trainer.save(LAST_NAME)
