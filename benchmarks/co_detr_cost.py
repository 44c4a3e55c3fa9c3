"""Co-DETR training cost: step time and peak memory for K auxiliary heads relative to K = 0, in one run.

    python benchmarks/co_detr_cost.py [--ks 0 1 2] [--steps 10] [--warmup 3] [--rounds 2] [--threads 1] [overrides]
    python benchmarks/co_detr_cost.py trainer.device=cuda trainer.amp_dtype=fp16   # on a GPU, with AMP

Each K runs in its own fresh process (`--worker`), on the same batches of the configured training set (default:
the synthetic dataset, default CPU preset of model=co_deformable_detr), in a Trainer built from the config as a
stage builds it: AdamW and schedule, gradient clipping, mixed precision (`trainer.amp_dtype`). The K processes run
in turn, `--rounds` times (so a change in machine load hits every K alike). A step = `Trainer.run_step` (forward +
backward + clip + optimizer and schedule step); the table gives the median over rounds of
`--steps` steps after `--warmup` of the wall time ("step s"; on CPU also the process CPU time, "cpu s", which a
busy shared machine inflates less), images per second, and peak memory (the largest over rounds):
- CUDA: torch.cuda.max_memory_allocated over the measured steps (tensors only);
- CPU: the process's peak resident set size (getrusage ru_maxrss, everything: Python, torch, data, model) and
  that peak minus the resident size once the model and data were ready ("step memory": activations, gradients
  and optimizer state of the training steps).
Ratios are to K = 0. Paper (Table 7, GPU): K=2 takes 1.7x the GPU hours and 1.12x the memory of K=0.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"


def rss_mib() -> float:
    """Current resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def worker(k: int, steps: int, warmup: int, overrides: list[str]) -> dict:
    """Train K heads for warmup + steps steps; returns the measurements as a dict."""
    import torch
    from hydra import compose, initialize_config_dir

    from stages.build import build_model
    from stages.common import seed_everything
    from stages.data.build import build_dataset, build_loader
    from stages.engine.optim import build_optimizer, build_scheduler
    from stages.engine.trainer import Trainer, to_device

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["model=co_deformable_detr", f"model.num_aux_heads={k}", "paths.run_dir=/tmp/unused", *overrides],
        )
    tcfg = cfg.trainer
    device = torch.device(tcfg.device)
    seed_everything(cfg.seed)
    dataset = build_dataset(cfg.data, "train", train=True, seed=cfg.seed)
    loader = build_loader(
        dataset, tcfg.batch_size, num_workers=0, shuffle=True, seed=cfg.seed, distributed=False, drop_last=True
    )
    batches = []
    for batch in loader:  # the same images for every K, loaded before timing
        batches.append(batch)
        if len(batches) == warmup + steps:
            break
    model = build_model(cfg.model, dataset.num_classes).to(device).train()
    optimizer = build_optimizer(model, tcfg.optimizer)
    scheduler = build_scheduler(optimizer, tcfg.max_iters, tcfg.scheduler)
    trainer = Trainer(
        model,
        None,
        optimizer,
        scheduler,
        tcfg.max_iters,
        device,
        clip_grad_norm=tcfg.clip_grad_norm,
        amp_dtype=tcfg.amp_dtype,
    )
    ready_rss = rss_mib()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times, cpu_times = [], []
    for step, batch in enumerate(batches):
        if step == warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        # Copied before the clock starts: the step's own copy is then a no-op.
        batch = to_device(batch, device)
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        trainer.run_step(batch)
        sync()
        if step >= warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    result = {
        "k": k,
        "times": times,
        "cpu_times": cpu_times,
        "heads": [h.split("_", 1)[1] for h in getattr(model, "aux_head_names", [])],
        "step_s": statistics.median(times),
        "images_per_s": tcfg.batch_size / statistics.median(times),
        "device": str(device) + (f" amp {tcfg.amp_dtype}" if tcfg.amp_dtype else ""),
        "threads": torch.get_num_threads(),
        "batch_size": tcfg.batch_size,
    }
    if device.type == "cuda":
        result["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["gpu"] = torch.cuda.get_device_name(device)
    else:
        result["peak_mib"] = peak_rss_mib()
        result["step_mib"] = peak_rss_mib() - ready_rss
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()

    if args.worker is not None:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(worker(args.worker, args.steps, args.warmup, overrides)))
        return

    runs: dict[int, list[dict]] = {k: [] for k in args.ks}
    for _ in range(args.rounds):
        for k in args.ks:
            command = [sys.executable, __file__, "--worker", str(k), "--steps", str(args.steps)]
            command += ["--warmup", str(args.warmup)] + (["--threads", str(args.threads)] if args.threads else [])
            proc = subprocess.run(command + overrides, cwd=REPO, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"K={k} failed:\n{proc.stderr[-3000:]}")
            runs[k].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    rows = []
    for results in runs.values():
        row = dict(results[0])
        row["step_s"] = statistics.median([t for r in results for t in r["times"]])
        row["images_per_s"] = row["batch_size"] / row["step_s"]
        row["cpu_s"] = statistics.median([t for r in results for t in r["cpu_times"]])
        for key in ("peak_mib", "step_mib"):
            if key in row:
                row[key] = max(r[key] for r in results)
        rows.append(row)

    base = next((r for r in rows if r["k"] == 0), rows[0])
    first = rows[0]
    where = first.get("gpu", f"cpu, {first['threads']} threads")
    print(
        f"Co-DETR training step, {first['device']} ({where}), batch {first['batch_size']}, "
        f"median of {args.rounds} x {args.steps} steps after {args.warmup}; ratios to K={base['k']}"
    )
    on_cpu = "step_mib" in first
    # (header, key, ratio to K=0?, format); CPU runs add process CPU seconds, robust to a busy machine.
    columns = [("step s", "step_s", True, ".3f")]
    if on_cpu:
        columns.append(("cpu s", "cpu_s", True, ".3f"))
    columns.append(("img/s", "images_per_s", False, ".2f"))
    columns.append(("peak RSS MiB" if on_cpu else "peak alloc MiB", "peak_mib", True, ".0f"))
    if on_cpu:
        columns.append(("step MiB", "step_mib", True, ".0f"))
    header = f"{'K':>2}  {'heads':<30}"
    for name, _, ratio, _ in columns:
        header += f"{name:>15}" + (f"{'x':>6}" if ratio else "")
    print(header)
    for r in rows:
        line = f"{r['k']:>2}  {'+'.join(r['heads']) or '-':<30}"
        for _, key, ratio, fmt in columns:
            line += f"{r[key]:>15{fmt}}" + (f"{r[key] / base[key]:>6.2f}" if ratio else "")
        print(line)


if __name__ == "__main__":
    main()
