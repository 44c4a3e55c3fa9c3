"""What box-domain pre-training costs: a box_pretrain iteration against a finetune iteration of the same model at the
same image size, and selective-search proposal throughput (fresh and from the cache).

    python benchmarks/box_pretrain_cost.py [--steps N] [--warmup N] [--size S] [--threads N]
        [hydra overrides, e.g. model=co_deformable_detr experiment=smoke trainer.batch_size=4]

Both iterations are built in this process from the same composed config (`stage=box_pretrain` plus the overrides):
- finetune: one labelled batch through the detector (its full losses), backward, gradient clipping, AdamW step;
- box_pretrain: one two-view batch through AlignDet (online detector on view 1 with box losses, momentum detector
  on view 2 without gradients, projectors, contrastive loss), backward, clipping, AdamW step, EMA update.
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
from collections.abc import Callable
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere, like run.py

from stages.box_pretrain import (  # noqa: E402
    build_aligndet,
    clamp_proposals,
    proposal_limit,
    two_view_forward,
)
from stages.build import build_model  # noqa: E402
from stages.data.build import build_dataset, build_loader  # noqa: E402
from stages.data.proposals import load_or_compute_proposals  # noqa: E402
from stages.data.two_view import build_two_view_dataset, collate_two_view  # noqa: E402
from stages.engine.optim import build_optimizer  # noqa: E402
from stages.engine.trainer import detection_forward, total_loss  # noqa: E402

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


def make_step(model, batches, forward, cfg, device, after: Callable[[], None] | None = None) -> Callable[[], float]:
    """One timed training iteration (data loading excluded): forward, backward, clip, AdamW step (+ `after`)."""
    optimizer = build_optimizer(model, cfg.trainer.optimizer)
    model.to(device).train()

    def step() -> float:
        batch = next(batches)
        start = time.perf_counter()
        loss = total_loss(forward(model, batch, device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.trainer.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.clip_grad_norm)
        optimizer.step()
        if after is not None:
            after()
        if device.type == "cuda":
            torch.cuda.synchronize()
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
    finetune_step = make_step(detector, endless(ft_loader), detection_forward, cfg, device)

    torch.manual_seed(cfg.seed)
    box_detector = build_model(cfg.model, plain.num_classes)
    proposals, _ = clamp_proposals(proposals, proposal_limit(box_detector, p_cfg.max_per_image))
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
    steps_done = [0]

    def ema() -> None:
        steps_done[0] += 1
        aligndet.update_momentum(steps_done[0] / (args.warmup + args.steps))

    box_step = make_step(aligndet, endless(box_loader), two_view_forward, cfg, device, after=ema)

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
        f"{p_cfg.num_workers} workers, limit {proposal_limit(box_detector, p_cfg.max_per_image)} per image)"
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
