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
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from stages.engine.checkpoint import CHECKPOINT_NAME, LAST_NAME, read_checkpoint, save_checkpoint
from stages.engine.distributed import all_reduce_mean, barrier, is_distributed, is_main_process
from stages.engine.metrics import MetricsLogger
from stages.engine.optim import build_optimizer, build_scheduler

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
    """Periodic work attached to the loop. `after_step` runs after every optimisation step."""

    def after_step(self, trainer: Trainer) -> None:
        pass


class Trainer:
    """Trains `model` on `loader` for `max_iters` steps, resuming from `<stage_dir>/last.pth` when present."""

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
        self.hooks = list(hooks or [])
        self.max_iters = self.tcfg.max_iters if self.tcfg.epochs is None else self.tcfg.epochs * len(loader)
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
    def state(self) -> dict:
        return {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iter": self.iter,
            "stage": self.stage,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }

    def save(self, name: str) -> Path:
        path = self.stage_dir / name
        if is_main_process():
            save_checkpoint(path, self.state())
        barrier()
        return path

    def resume(self) -> bool:
        """Continue from last.pth: weights, optimizer, schedule and iteration. The data order restarts at the
        resumed epoch with that epoch's seed, so a resumed run sees the same images per epoch, not per step."""
        path = self.stage_dir / LAST_NAME
        if not path.exists():
            return False
        payload = read_checkpoint(path)
        unwrap(self.model).load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.scaler.load_state_dict(payload["scaler"])
        self.iter = int(payload["iter"])
        log.info("[%s] resumed from %s at iteration %d", self.stage, path, self.iter)
        return True

    # --- the loop ----------------------------------------------------------------------------------------
    def batches(self) -> Iterator:
        self.epoch = self.iter // max(1, len(self.loader))
        while True:
            if isinstance(self.loader.sampler, DistributedSampler):
                self.loader.sampler.set_epoch(self.epoch)
            if self.loader_seed is not None:
                self.loader.generator.manual_seed(self.loader_seed + self.epoch)
            yield from self.loader
            self.epoch += 1

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
        """Run to max_iters; returns the last logged losses. Writes last.pth periodically, checkpoint.pth at the end."""
        self.model.train()
        resumed = self.resume()
        self.logger = MetricsLogger(self.stage_dir, self.stage, self.cfg, resume_iter=self.iter if resumed else None)
        hooks = [LogHook(self.tcfg.log_every), CheckpointHook(self.tcfg.checkpoint_every), *self.hooks]
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
            for hook in hooks:
                hook.after_step(self)
            bar.update(1)
            bar.set_postfix(loss=f"{self.last_losses['loss']:.3f}")
        bar.close()
        self.train_seconds = time.perf_counter() - start
        self.save(LAST_NAME)
        final = self.save(CHECKPOINT_NAME)
        self.logger.close()
        return {"checkpoint": str(final), "iter": self.iter, "final_losses": self.last_losses}

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


class CheckpointHook(Hook):
    """Every `every` steps: last.pth, for resuming a killed run with the same command."""

    def __init__(self, every: int):
        self.every = max(1, int(every))

    def after_step(self, trainer: Trainer) -> None:
        if trainer.iter % self.every == 0 and trainer.iter < trainer.max_iters:
            trainer.save(LAST_NAME)
