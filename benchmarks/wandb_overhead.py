"""Overhead of W&B logging (offline) on a finetune training iteration. Goal: under 2 %.

    python benchmarks/wandb_overhead.py [--rounds 7] [--iters 40] [--calls 200] [--threads 1] [--json PATH]
        [hydra overrides, default: experiment=smoke model=co_deformable_detr model.num_aux_heads=2]

Everything runs in this one process, on finetune's model, data and Trainer as the stage builds them
(`StageContext.trainer`: its logging and checkpoint hooks included):

1. Training loop. The Trainer trains `--iters` iterations with `logger=none`, then with `logger=wandb` (offline,
   files in a temporary run directory), alternating for `--rounds` rounds (and which goes first) so that other
   load on the machine hits both alike. A hook reads the clocks after the first and the last step, so the numbers
   cover iterations 2..N, hooks included (logging every `trainer.log_every` iterations as configured, W&B's
   console capture of the progress bar) and leave out W&B's start and finish, which happen once per stage:
   - wall ms/iter: what training waits for. On a shared machine, quote the median with its spread.
   - CPU ms/iter: this process's CPU time (all its threads, W&B's Python side included) per iteration; steadier
     than the wall clock under outside load, and with --threads 1 close to it.
   - service CPU ms/iter: CPU time of this process's child processes over the same iterations (Linux /proc),
     i.e. W&B's wandb-core writing the run (stopped after each W&B run, so the logger=none runs have none); it
     runs beside training and costs wall time only when no core is free.
   Periodic last.pth writes are moved out of the loop (trainer.checkpoint_every > iters): they cost the same
   with and without W&B and only add disk noise.
2. Per logging call. `MetricsLogger.log` with the dict the trainer logs (every loss term, lr, sec_per_iter,
   eta_min, read back from a run's metrics.jsonl), `--calls` times with W&B and without; the difference per call
   over `trainer.log_every`, relative to the median wall time per iteration of (1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from stages.build import build_model
from stages.context import open_stage
from stages.data.build import build_dataset, build_train_loader
from stages.engine.metrics import MetricsLogger
from stages.engine.trainer import Hook, Trainer

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"
DEFAULT_OVERRIDES = ["experiment=smoke", "model=co_deformable_detr", "model.num_aux_heads=2"]
LOGGERS = ("none", "wandb")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7, help="training runs per logger, alternating")
    p.add_argument("--iters", type=int, default=40, help="training iterations per run")
    p.add_argument("--calls", type=int, default=200, help="MetricsLogger.log calls per logger")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    return p.parse_known_args(argv)


def children_cpu_seconds() -> float | None:
    """User + system CPU seconds of this process's live child processes (Linux /proc); None elsewhere."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return None
    ticks, me = 0, os.getpid()
    for stat in proc.glob("[0-9]*/stat"):
        try:
            # Fields after the ")" that ends the command name: state ppid ... utime(12th) stime(13th).
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == me:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


class LoopClock(Hook):
    """The wall, CPU and child-process CPU clocks after the first and the last step."""

    def __init__(self):
        self.marks: list[tuple[float, float, float | None]] = []

    def after_step(self, trainer: Trainer) -> None:
        if trainer.iter in (1, trainer.max_iters):
            self.marks.append((time.perf_counter(), time.process_time(), children_cpu_seconds()))


def config(overrides: list[str], logger: str, run_dir: Path, iters: int) -> DictConfig:
    extra = [
        "stage=finetune",
        f"logger={logger}",
        f"trainer.max_iters={iters}",
        f"trainer.checkpoint_every={iters + 1}",
        f"paths.run_dir={run_dir}",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides + extra)
    if logger == "wandb":
        with open_dict(cfg):
            cfg.logger.mode = "offline"  # never upload from a benchmark
            cfg.logger.tags = ["benchmark"]
    return cfg


def train(cfg: DictConfig) -> dict[str, float | None]:
    """One finetune training run (finetune's model, data, loader and `StageContext.trainer` with its hooks);
    ms per iteration over iterations 2..N."""
    ctx = open_stage(cfg)
    dataset = build_dataset(cfg.data, "train", train=True, seed=cfg.seed)
    model = build_model(cfg.model, dataset.num_classes)
    loader = build_train_loader(dataset, cfg.trainer, cfg.seed, distributed=False)
    trainer = ctx.trainer(model, loader)
    clock = LoopClock()
    # Last, so that each mark falls after the step's logging and checkpoint hooks: the interval holds whole
    # iterations.
    trainer.hooks.append(clock)
    trainer.train()
    (wall0, cpu0, child0), (wall1, cpu1, child1) = clock.marks
    n = trainer.max_iters - 1
    return {
        "wall": (wall1 - wall0) / n * 1e3,
        "cpu": (cpu1 - cpu0) / n * 1e3,
        "service_cpu": (child1 - child0) / n * 1e3 if child0 is not None else None,
    }


def per_call_ms(cfg: DictConfig, stage_dir: Path, values: dict, calls: int) -> float:
    """Median ms of one MetricsLogger.log call (console line off: the same for both loggers)."""
    logger = MetricsLogger(stage_dir, "finetune", cfg)
    times = []
    for step in range(1, calls + 1):
        t0 = time.perf_counter()
        logger.log(step, values, console=False)
        times.append(time.perf_counter() - t0)
    logger.close()
    return statistics.median(times) * 1e3


def main(argv: list[str]) -> dict:
    args, overrides = parse_args(argv)
    overrides = overrides or DEFAULT_OVERRIDES
    if args.iters < 2:
        raise SystemExit("--iters: expected at least 2 (the first iteration is left out)")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_SILENT", "true")
    runs: dict[str, list[dict]] = {name: [] for name in LOGGERS}
    with tempfile.TemporaryDirectory(prefix="wandb_overhead_") as tmp:
        tmp = Path(tmp)
        for r in range(args.rounds):
            for name in LOGGERS if r % 2 == 0 else LOGGERS[::-1]:
                cfg = config(overrides, name, tmp / f"{name}{r}", args.iters)
                runs[name].append(train(cfg))
                if name == "wandb":
                    # Stop W&B's service process, which otherwise idles on through the next logger=none run.
                    sys.modules["wandb"].teardown()
                print(f"round {r + 1}/{args.rounds} {name:>5}: {runs[name][-1]['wall']:.1f} ms/iter", flush=True)
        log_every = int(cfg.trainer.log_every)
        values = json.loads((tmp / "none0" / "finetune" / "metrics.jsonl").read_text().splitlines()[-1])
        values.pop("iter")
        call = {
            name: per_call_ms(
                config(overrides, name, tmp / f"calls_{name}", 2), tmp / f"calls_{name}", values, args.calls
            )
            for name in LOGGERS
        }

    def median(name: str, key: str) -> float | None:
        numbers = [run[key] for run in runs[name] if run[key] is not None]
        return statistics.median(numbers) if numbers else None

    wall = {name: median(name, "wall") for name in LOGGERS}
    cpu = {name: median(name, "cpu") for name in LOGGERS}
    service = {name: median(name, "service_cpu") for name in LOGGERS}
    result = {
        "overrides": overrides,
        "iters": args.iters,
        "rounds": args.rounds,
        "threads": args.threads,
        "log_every": log_every,
        "logged_keys": len(values),
        "wall_ms_per_iter": {name: [round(run["wall"], 2) for run in runs[name]] for name in LOGGERS},
        "median_wall_ms_per_iter": wall,
        "median_cpu_ms_per_iter": cpu,
        "median_service_cpu_ms_per_iter": service,
        "wall_overhead_pct": (wall["wandb"] / wall["none"] - 1) * 100,
        "cpu_overhead_pct": (cpu["wandb"] / cpu["none"] - 1) * 100,
        "log_call_ms": call,
        "log_call_overhead_pct": (call["wandb"] - call["none"]) / log_every / wall["none"] * 100,
    }

    print()
    print(f"finetune {' '.join(overrides)}")
    print(f"{args.iters} iterations x {args.rounds} rounds, log_every={log_every}, {len(values)} logged values")
    header = f"{'logger':<8}{'wall ms/iter':>14}{'(min-max)':>16}{'CPU ms/iter':>13}{'service CPU':>13}{'log() ms':>10}"
    print(header)
    for name in LOGGERS:
        walls = [run["wall"] for run in runs[name]]
        spread = f"({min(walls):.1f}-{max(walls):.1f})"
        service_ms = f"{service[name]:.2f}" if service[name] is not None else "-"
        print(f"{name:<8}{wall[name]:>14.1f}{spread:>16}{cpu[name]:>13.1f}{service_ms:>13}{call[name]:>10.3f}")
    print(
        f"W&B overhead per iteration: wall {result['wall_overhead_pct']:+.2f} %, CPU {result['cpu_overhead_pct']:+.2f} %"
    )
    print(
        f"log() calls alone: {result['log_call_overhead_pct']:.3f} % "
        f"({call['wandb'] - call['none']:.3f} ms more per call, one call per {log_every} iterations); goal < 2 %"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
