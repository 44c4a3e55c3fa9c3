"""What box-domain pre-training costs: a box_pretrain iteration against a finetune iteration of the same model at the
same image size, and selective-search proposal throughput (fresh and from the cache).

    python benchmarks/box_pretrain_cost.py [--steps N] [--warmup N] [--size S] [--threads N]
        [hydra overrides, e.g. model=co_deformable_detr experiment=smoke trainer.batch_size=4]

Both iterations are built in this process from the same composed config (`stage=box_pretrain` plus the overrides),
each a `Trainer.run_step` with the config's AdamW, schedule, clipping and mixed precision, then the step's hooks:
- finetune: one labelled batch through the detector (its full losses), backward, gradient clipping, AdamW step;
- box_pretrain: one two-view batch through AlignDet (online detector on view 1 with box losses, momentum detector
  on view 2 without gradients, projectors, contrastive loss), backward, clipping, AdamW step, then the stage's
  `MomentumUpdate` hook (the EMA update).
Every image is resized to a short side of `--size` (long side at most 2x) in both, so only the work differs. After
`--warmup` steps each, the two take timed steps in turn (so load from other processes hits both alike); the table
gives the median seconds per iteration. Proposals: one fresh computation into an empty cache folder with
`stage.proposals.num_workers` workers, then a cache hit, on the configured train split.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch import nn

from stages.box_pretrain import MomentumUpdate, build_aligndet, clamp_proposals, proposal_limit, two_view_forward
from stages.build import build_model
from stages.data.build import build_dataset, build_loader
from stages.data.proposals import load_or_compute_proposals
from stages.data.two_view import build_two_view_dataset, collate_two_view
from stages.engine.optim import build_optimizer, build_scheduler
from stages.engine.trainer import ForwardFn, Hook, Trainer, detection_forward

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed iterations of each kind")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations of each kind first")
    p.add_argument("--size", type=int, default=None, help="short side of every image (default: the config's first)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return p.parse_known_args(argv)


def endless(loader):
    while True:
        yield from loader


def make_step(
    model: nn.Module,
    batches: Iterator,
    forward: ForwardFn,
    cfg: DictConfig,
    device: torch.device,
    max_iters: int,
    hooks: Sequence[Hook] = (),
) -> Callable[[], float]:
    """One timed training iteration (data loading excluded): `Trainer.run_step`, then every hook's `after_step`,
    as `Trainer.train` runs them."""
    model.to(device).train()
    tcfg = cfg.trainer
    optimizer = build_optimizer(model, tcfg.optimizer)
    scheduler = build_scheduler(optimizer, max_iters, tcfg.scheduler)
    trainer = Trainer(
        model,
        None,
        optimizer,
        scheduler,
        max_iters,
        device,
        forward_fn=forward,
        hooks=hooks,
        clip_grad_norm=tcfg.clip_grad_norm,
        amp_dtype=tcfg.amp_dtype,
    )

    def step() -> float:
        batch = next(batches)
        start = time.perf_counter()
        trainer.run_step(batch)
        trainer.iter += 1
        for hook in trainer.hooks:
            hook.after_step(trainer)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    return step


def main(argv: list[str]) -> None:
    args, overrides = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["stage=box_pretrain", *overrides])
    size = args.size or int(cfg.data.transforms.train.min_sizes[0])
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "stage=box_pretrain",
                *overrides,
                f"data.transforms.train.min_sizes=[{size}]",
                f"data.transforms.train.max_size={2 * size}",
            ],
        )
    device = torch.device(cfg.trainer.device)
    batch_size = cfg.trainer.batch_size

    # Proposals: fresh into an empty folder, then from the cache.
    plain = build_dataset(cfg.data, "train", train=False, seed=cfg.seed)
    p_cfg = cfg.stage.proposals
    with tempfile.TemporaryDirectory() as tmp:
        _, fresh = load_or_compute_proposals(plain, p_cfg, tmp, p_cfg.num_workers)
        proposals, cached = load_or_compute_proposals(plain, p_cfg, tmp, p_cfg.num_workers)

    torch.manual_seed(cfg.seed)
    labelled = build_dataset(cfg.data, "train", train=True, seed=cfg.seed)
    detector = build_model(cfg.model, labelled.num_classes)
    ft_loader = build_loader(labelled, batch_size, 0, shuffle=True, seed=cfg.seed, distributed=False, drop_last=True)
    total = args.warmup + args.steps
    finetune_step = make_step(detector, endless(ft_loader), detection_forward, cfg, device, total)

    torch.manual_seed(cfg.seed)
    box_detector = build_model(cfg.model, plain.num_classes)
    proposals, _ = clamp_proposals(proposals, proposal_limit(box_detector, cfg.model.box_pretrain.max_proposals))
    views = build_two_view_dataset(plain, proposals, cfg.stage.views)
    box_loader = build_loader(
        views,
        batch_size,
        0,
        shuffle=True,
        seed=cfg.seed,
        distributed=False,
        drop_last=True,
        collate_fn=collate_two_view,
    )
    aligndet = build_aligndet(box_detector, cfg.stage)
    box_step = make_step(aligndet, endless(box_loader), two_view_forward, cfg, device, total, [MomentumUpdate()])

    for _ in range(args.warmup):
        finetune_step()
        box_step()
    ft_times, box_times = [], []
    for _ in range(args.steps):
        ft_times.append(finetune_step())
        box_times.append(box_step())
    ft, box = statistics.median(ft_times), statistics.median(box_times)

    print(
        f"\nmodel {cfg.model.name}, data {cfg.data.name}, batch {batch_size}, short side {size}, device {device}, "
        f"threads {torch.get_num_threads()}, {args.steps} timed steps after {args.warmup} warm-up"
    )
    print(f"| {'iteration':<13} | {'s/iter':>7} | {'images/s':>8} | {'x finetune':>10} |")
    print(f"|{'-' * 15}|{'-' * 9}|{'-' * 10}|{'-' * 12}|")
    print(f"| {'finetune':<13} | {ft:>7.3f} | {batch_size / ft:>8.1f} | {1.0:>10.2f} |")
    print(f"| {'box_pretrain':<13} | {box:>7.3f} | {batch_size / box:>8.1f} | {box / ft:>10.2f} |")
    print(
        f"\nproposals ({len(plain)} images, mode={p_cfg.mode}, max_side={p_cfg.max_side}, "
        f"{p_cfg.num_workers} workers, limit {proposal_limit(box_detector, cfg.model.box_pretrain.max_proposals)} per image)"
    )
    print(f"| {'run':<10} | {'seconds':>8} | {'images/s':>9} | {'boxes/image':>11} | {'skipped':>7} |")
    print(f"|{'-' * 12}|{'-' * 10}|{'-' * 11}|{'-' * 13}|{'-' * 9}|")
    for name, stats in (("fresh", fresh), ("cache hit", cached)):
        print(
            f"| {name:<10} | {stats.seconds:>8.2f} | {stats.images_per_second:>9.1f} | "
            f"{stats.boxes_per_image:>11.1f} | {stats.num_skipped:>7d} |"
        )


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main(sys.argv[1:])
