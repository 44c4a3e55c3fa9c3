"""The one training loop, a plain object: model, loader, optimizer, scheduler and a list of hooks.

`Trainer.run_step` does one optimisation step. Everything periodic hangs on hooks called before training, after
every step and after training: the momentum update of a teacher, `CheckpointHook` (resume from last.pth, save it
every N steps and at the end), the stage's final checkpoint, `LogHook` (console, metrics.jsonl, W&B). The trainer
reads no config: the stage builds it and its hooks (`stages/context.py: StageContext.trainer`), and the
benchmarks time `run_step` on the same object.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.losses.detr_loss import check_finite
from stages.common import get_rng_state, set_rng_state
from stages.data.build import EpochSampler
from stages.engine.checkpoint import read_checkpoint, save_checkpoint
from stages.engine.distributed import all_gather_object, all_reduce_mean, barrier, is_main_process, rank
from stages.engine.metrics import MetricsLogger
from stages.errors import UserError

log = logging.getLogger("detpipe")

LossDict = dict[str, torch.Tensor]
# trainer.amp_dtype: null trains in float32.
AMP_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
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
    check_finite(terms, "training step")
    return sum(terms.values())


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself inside its DistributedDataParallel wrapper."""
    return model.module if isinstance(model, DistributedDataParallel) else model


class Hook:
    """Work attached to the loop: `before_train`, `after_step` (after every optimisation step), `after_train`.
    A hook that keeps state across steps returns it from `state_dict`, so that last.pth carries it and a resumed
    run continues it."""

    def before_train(self, trainer: Trainer) -> None:
        pass

    def after_step(self, trainer: Trainer) -> None:
        pass

    def after_train(self, trainer: Trainer) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Trainer:
    """Trains `model` (already on `device`, DDP-wrapped when distributed) on `loader` for `max_iters` steps.

    Hooks run in list order. The loop starts at `self.iter` (`CheckpointHook.resume` sets it) and, with an
    `EpochSampler` loader, at that iteration's batch within its epoch, so a resumed run reads the batches the
    killed one would have read next."""

    def __init__(
        self,
        model: nn.Module,
        loader: DataLoader,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        max_iters: int,
        device: torch.device,
        forward_fn: ForwardFn = detection_forward,
        hooks: Sequence[Hook] = (),
        clip_grad_norm: float | None = None,
        amp_dtype: str | None = None,
        name: str = "train",
    ):
        if max_iters < 1:
            raise ValueError(f"Trainer: max_iters {max_iters}; expected at least 1")
        self.model = model
        self.loader = loader
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.max_iters = int(max_iters)
        self.device = device
        self.forward_fn = forward_fn
        self.hooks = list(hooks)
        self.clip_grad_norm = clip_grad_norm
        if amp_dtype not in AMP_DTYPES:
            raise UserError(f"trainer.amp_dtype: {amp_dtype!r}; expected one of {list(AMP_DTYPES)}")
        # Mixed precision: autocast to amp_dtype on the model's device; gradient scaling only for float16, whose
        # narrow exponent range underflows small gradients (bfloat16 has float32's range).
        self.amp_dtype = AMP_DTYPES[amp_dtype]
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype is torch.float16)
        self.name = name
        # Each epoch's shuffle is seeded from the loader's own seed (rank-specific under DDP) and the epoch.
        self.loader_seed = loader.generator.initial_seed() if getattr(loader, "generator", None) is not None else None
        self.iter = 0
        self.epoch = 0
        self.last_losses: dict[str, float] = {}
        self.step_seconds = 0.0
        self.train_seconds = 0.0

    # --- state -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Weights, optimizer, schedule, gradient scaler, iteration and every hook's state."""
        return {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iter": self.iter,
            # By class name: a resumed run may attach other stateless hooks, in another order.
            "hooks": {type(hook).__name__: hook.state_dict() for hook in self.hooks if hook.state_dict()},
        }

    def load_state_dict(self, state: dict) -> None:
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        hook_states = state.get("hooks", {})
        for hook in self.hooks:
            if type(hook).__name__ in hook_states:
                hook.load_state_dict(hook_states[type(hook).__name__])
        self.iter = int(state["iter"])

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
        """One optimisation step on `batch`: forward, the summed loss, backward, clipping, optimizer and schedule."""
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        with autocast:
            losses = self.forward_fn(self.model, batch, self.device)
        loss = total_loss(losses)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        losses["loss"] = loss
        return losses

    def train(self) -> dict:
        """Run to max_iters; returns the iteration reached and the last step's losses."""
        self.model.train()
        for hook in self.hooks:
            hook.before_train(self)
        data = self.batches()
        bar = tqdm(total=self.max_iters, initial=self.iter, desc=self.name, disable=not is_main_process())
        start = time.perf_counter()
        while self.iter < self.max_iters:
            t0 = time.perf_counter()
            losses = self.run_step(next(data))
            self.iter += 1
            self.step_seconds = time.perf_counter() - t0
            # One copy to the host for all values (one wait for the device, not one per value).
            values = torch.stack([v.detach().float().reshape(()) for v in losses.values()]).tolist()
            self.last_losses = dict(zip(losses, values))
            for hook in self.hooks:
                hook.after_step(self)
            bar.update(1)
            bar.set_postfix(loss=f"{self.last_losses['loss']:.3f}")
        bar.close()
        self.train_seconds = time.perf_counter() - start
        for hook in self.hooks:
            hook.after_train(self)
        return {"iter": self.iter, "final_losses": self.last_losses}

    def lr(self) -> float:
        """The base learning rate (the group with multiplier 1, else the first)."""
        groups = self.optimizer.param_groups
        group = next((g for g in groups if g.get("lr_mult", 1.0) == 1.0), groups[0])
        return group["lr"]


class CheckpointHook(Hook):
    """last.pth: the full training state plus every rank's random generators, wrapped by `payload` (the stage's
    checkpoint layout: stage, config, fingerprint...), saved every `every` steps and at the end. `resume` loads
    it back (refused when the file's fingerprint is not `fingerprint`). Listed after the hooks whose state it
    saves (LogHook), so that a step's state is complete when it is written."""

    def __init__(self, path: Path, every: int, payload: Callable[[dict], dict], fingerprint: str | None):
        self.path = Path(path)
        self.every = max(1, int(every))
        self.payload = payload
        self.fingerprint = fingerprint

    def save(self, trainer: Trainer) -> Path:
        """Write the training state to last.pth; a collective call under DDP."""
        rng_states = all_gather_object(get_rng_state())
        if is_main_process():
            save_checkpoint(self.path, self.payload({**trainer.state_dict(), "rng": rng_states}))
        barrier()
        return self.path

    def resume(self, trainer: Trainer) -> bool:
        """Continue from last.pth when it exists: the trainer's state, its hooks' and this rank's generators."""
        if not self.path.exists():
            return False
        payload = read_checkpoint(self.path)
        if payload.get("fingerprint") != self.fingerprint:
            raise UserError(
                f"{self.path}: written by a run with fingerprint {payload.get('fingerprint')}, not this run's "
                f"{self.fingerprint}; expected the same settings to resume it"
            )
        trainer.load_state_dict(payload)
        rng_states = payload.get("rng") or []
        if rank() < len(rng_states):
            set_rng_state(rng_states[rank()])
        log.info("[%s] resumed from %s at iteration %d", trainer.name, self.path, trainer.iter)
        return True

    def after_step(self, trainer: Trainer) -> None:
        if trainer.iter % self.every == 0 and trainer.iter < trainer.max_iters:
            self.save(trainer)

    def after_train(self, trainer: Trainer) -> None:
        self.save(trainer)


class CallbackHook(Hook):
    """Calls `after_train(trainer)` once training ends: the stage's final checkpoint.pth, listed before the
    LogHook, which closes the W&B run (and may upload that file)."""

    def __init__(self, after_train: Callable[[Trainer], object]):
        self.callback = after_train

    def after_train(self, trainer: Trainer) -> None:
        self.callback(trainer)


class LogHook(Hook):
    """Every `every` steps: the mean of each loss term over the interval, lr, seconds per iteration and ETA, to
    the console, metrics.jsonl and W&B (the `MetricsLogger` that `make_logger(resume_iter)` opens before
    training, truncating metrics.jsonl to what a resumed run's checkpoint holds). Closes the logger after training."""

    def __init__(self, every: int, make_logger: Callable[[int | None], MetricsLogger]):
        self.every = max(1, int(every))
        self.make_logger = make_logger
        self.logger: MetricsLogger | None = None
        self.sums: dict[str, float] = {}
        self.count = 0
        self.seconds = 0.0

    def before_train(self, trainer: Trainer) -> None:
        self.logger = self.make_logger(trainer.iter if trainer.iter > 0 else None)

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
        self.logger.log(trainer.iter, values)
        self.sums, self.count, self.seconds = {}, 0, 0.0

    def after_train(self, trainer: Trainer) -> None:
        if self.logger is not None:
            self.logger.close()

    def state_dict(self) -> dict:
        # The running sums of the interval in progress, so a resumed run logs the same means.
        return {"sums": dict(self.sums), "count": self.count, "seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        self.sums, self.count, self.seconds = dict(state["sums"]), int(state["count"]), float(state["seconds"])


def iterations(max_iters: int, epochs: int | None, batches_per_epoch: int) -> int:
    """`max_iters`, or `epochs` x batches per epoch when epochs is set; a UserError when that gives none."""
    if epochs is not None:
        total = int(epochs) * batches_per_epoch
        if total < 1:
            raise UserError(
                f"trainer.epochs: {epochs} x {batches_per_epoch} batches per epoch gives {total} iterations; "
                "expected at least 1"
            )
        return total
    if max_iters < 1:
        raise UserError(f"trainer.max_iters: {max_iters}; expected at least 1")
    return int(max_iters)


def compile_modules(model: nn.Module, names: Sequence[str]) -> list[str]:
    """torch.compile, in place, every submodule whose qualified name is one of `names` or ends with `.<name>`
    (`backbone` also finds AlignDet's `detector.backbone`); returns the compiled names. In place (`Module.compile`)
    keeps the state-dict keys. The parts compiled are the dense tensor work: the whole detector, with its
    matching, assigners and host-side bookkeeping, breaks the graph at every `.item()` and compiles for minutes."""
    wanted = tuple(names)
    compiled = []
    for name, module in model.named_modules():
        if name and any(name == n or name.endswith(f".{n}") for n in wanted):
            if any(name.startswith(f"{done}.") for done in compiled):
                continue
            module.compile()
            compiled.append(name)
    if wanted and not compiled:
        raise UserError(f"trainer.compile_modules: none of {list(wanted)} names a submodule of {type(model).__name__}")
    return compiled


def wrap_model(model: nn.Module, device: torch.device, distributed: bool) -> nn.Module:
    """`model` on `device`, in DistributedDataParallel when `distributed`."""
    model.to(device)
    if not distributed:
        return model
    ids = [device.index] if device.type == "cuda" else None
    # Auxiliary heads may leave parameters without gradient in a step (e.g. no positives).
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def run_steps(trainer: Trainer, batches: Iterable, steps: int) -> list[float]:
    """Seconds of each of `steps` `run_step` calls, cycling through `batches` (the benchmarks' timing loop)."""
    batches = list(batches)
    seconds = []
    for i in range(steps):
        start = time.perf_counter()
        trainer.run_step(batches[i % len(batches)])
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        seconds.append(time.perf_counter() - start)
    return seconds
