"""AdamW with per-module learning-rate multipliers, and warmup + step/cosine schedules."""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig
from torch import nn

from stages.errors import UserError


def param_groups(model: nn.Module, lr: float, weight_decay: float, lr_mults: dict[str, float]) -> list[dict]:
    """One group per multiplier: a parameter takes the first `lr_mults` substring its name contains."""
    groups: dict[float, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mult = next((m for key, m in lr_mults.items() if key in name), 1.0)
        groups.setdefault(float(mult), []).append(p)
    return [
        {"params": ps, "lr": lr * mult, "lr_mult": mult, "weight_decay": weight_decay}
        for mult, ps in sorted(groups.items())
    ]


OPTIMIZERS = ("adamw", "sgd")


def build_optimizer(model: nn.Module, opt_cfg: DictConfig) -> torch.optim.Optimizer:
    """`trainer.optimizer`: AdamW (lr, betas, weight_decay) or SGD with momentum (lr, momentum, weight_decay),
    with per-name lr multipliers (`lr_mults`) and, for both, torch's fused implementation when `fused`."""
    groups = param_groups(model, opt_cfg.lr, opt_cfg.weight_decay, dict(opt_cfg.get("lr_mults", {}) or {}))
    fused = bool(opt_cfg.get("fused", False))
    name = opt_cfg.get("name", "adamw")
    if name == "adamw":
        return torch.optim.AdamW(
            groups, lr=opt_cfg.lr, betas=tuple(opt_cfg.betas), weight_decay=opt_cfg.weight_decay, fused=fused
        )
    if name == "sgd":
        return torch.optim.SGD(
            groups, lr=opt_cfg.lr, momentum=opt_cfg.momentum, weight_decay=opt_cfg.weight_decay, fused=fused
        )
    raise UserError(f"trainer.optimizer.name: unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")


def lr_factor(it: int, max_iters: int, sched_cfg: DictConfig) -> float:
    """The learning-rate factor at iteration `it`: linear warmup, then step decay or cosine."""
    if it < sched_cfg.warmup_iters:
        alpha = it / max(1, sched_cfg.warmup_iters)
        warm = sched_cfg.warmup_factor * (1 - alpha) + alpha
    else:
        warm = 1.0
    if sched_cfg.name == "step":
        passed = sum(1 for m in sched_cfg.milestones if it >= int(m * max_iters))
        return warm * sched_cfg.gamma**passed
    if sched_cfg.name == "cosine":
        progress = min(1.0, it / max(1, max_iters))
        floor = sched_cfg.min_lr_factor
        return warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
    raise UserError(f"trainer.scheduler.name: unknown schedule {sched_cfg.name!r}; expected step or cosine")


def build_scheduler(optimizer: torch.optim.Optimizer, max_iters: int, sched_cfg: DictConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, max_iters, sched_cfg))
