"""AlignDet's data-fraction table in miniature: fine-tune on a fraction of the labelled images starting from
(a) the image-domain backbone only or (b) the box-pretrained detector, with the same fine-tuning budget, over
several fine-tuning seeds.

    python benchmarks/aligndet_fraction.py --out DIR [--fractions 0.05 0.1 1.0] [--seeds 0 1 2] [--subset-seed 0]
        --image-iters N --box-iters N --finetune-iters N [N ...] [--data-dir DIR] [--backbone-labels all|fraction]
        [--image-args ...] [--image-setting NAME [overrides ...]]... [--box-setting NAME [overrides ...]]...
        [--finetune-args ...] [-- overrides]

Every step is a `python run.py` subprocess, in this order:
1. `stage=image_pretrain` (MoCo v3 on the training images' proposal crops by default) -> DIR/pretrain/image_pretrain;
2. per image setting NAME (a control: more image-domain training for the same budget as box pre-training):
   `stage=image_pretrain stage.init_from=DIR/pretrain/image_pretrain <its overrides>` -> DIR/pretrain/NAME/
   image_pretrain (only its own overrides: it reads every training image unless they say otherwise);
3. per box setting NAME: `stage=box_pretrain stage.init_from=DIR/pretrain/image_pretrain <its overrides>` ->
   DIR/pretrain/box_NAME/box_pretrain (labels unused: AlignDet on all training images);
4. for each fraction f, seed s and start in {image, NAME..., box_NAME...}: `stage=finetune data.fraction=f seed=s
   stage.init_from=<the start's dir>` then `stage=eval`, in DIR/<start>_f<f>_s<s>/ (`_it<n>` added when
   --finetune-iters lists several budgets).
Every run gets `data.subset_seed=<--subset-seed>`, so all seeds fine-tune on the same labelled images; the
pre-training steps run once with `seed=<--subset-seed>`, so all seeds start from the same weights and only the
fine-tuning seed (head init, data order, augmentation) varies. Without --box-setting and --image-setting there is
one box setting, `box`, with no overrides.
With `--backbone-labels fraction`, steps 1 to 3 run once per fraction, in DIR/pretrain_f<f>/, and the first
image_pretrain gets `data.fraction=f`: a supervised image-domain backbone then sees only the labels that fraction
fine-tunes on, as in the paper, where the backbone never saw the detection labels. box_pretrain still reads every
training image (it uses no labels). `all` (the default) pre-trains once on every image, labels included when the
method uses them. The overrides after `--` go to every run (e.g. `model=co_deformable_detr trainer.batch_size=4`);
--image-args and --finetune-args go to that stage only. A step whose summary.json already exists is reused, so an
interrupted table resumes, and a second call with more fractions or seeds only runs the new cells. Prints, per
fraction, budget and start, the mean and sample standard deviation of AP and AP50 (COCO, percent) over the seeds and
the gain of each other start over (a) with its standard error (sqrt(sd_a^2/n_a + sd_b^2/n_b)); DIR/table.md holds
the table and DIR/table.json every seed's numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMAGE_START = "image"


def parse_args(argv: list[str]) -> argparse.Namespace:
    if "--" in argv:
        split = argv.index("--")
        argv, common = argv[:split], argv[split + 1 :]
    else:
        common = []
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for every run and the table")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1, 1.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="fine-tuning seeds of every cell")
    p.add_argument("--subset-seed", type=int, default=0, help="data.subset_seed, and the pre-training stages' seed")
    p.add_argument("--image-iters", type=int, required=True, help="image_pretrain iterations")
    p.add_argument("--box-iters", type=int, required=True, help="box_pretrain iterations")
    p.add_argument(
        "--finetune-iters", type=int, nargs="+", required=True, help="finetune iterations of every cell (one or more)"
    )
    p.add_argument("--data-dir", type=Path, default=None, help="paths.data_dir (default: the config's)")
    p.add_argument(
        "--backbone-labels",
        choices=("all", "fraction"),
        default="all",
        help="image_pretrain on every training image (all) or on each fraction's images only (fraction)",
    )
    p.add_argument("--image-args", nargs="*", default=[], help="overrides for image_pretrain only")
    p.add_argument(
        "--image-setting",
        nargs="+",
        action="append",
        metavar=("NAME", "OVERRIDE"),
        help="a second image_pretrain from the first: its name, then its overrides (repeat for several)",
    )
    p.add_argument(
        "--box-setting",
        nargs="+",
        action="append",
        metavar=("NAME", "OVERRIDE"),
        help="a box_pretrain setting: its name, then its overrides (repeat for several settings)",
    )
    p.add_argument("--finetune-args", nargs="*", default=[], help="overrides for finetune only")
    args = p.parse_args(argv)
    args.common = common
    args.image_settings = {name: overrides for name, *overrides in (args.image_setting or [])}
    default_box = [] if args.image_setting else [["box"]]
    args.box_settings = {name: overrides for name, *overrides in (args.box_setting or default_box)}
    names = [IMAGE_START, *args.image_settings, *args.box_settings]
    if len(set(names)) < len(names):
        p.error(f"--image-setting / --box-setting: names must differ from each other and from {IMAGE_START!r}")
    return args


def run_stage(stage: str, run_dir: Path, overrides: list[str], args: argparse.Namespace) -> dict:
    """`python run.py stage=<stage> ...` into run_dir (skipped when its summary exists); returns the summary."""
    summary = run_dir / stage / "summary.json"
    if summary.exists():
        print(f"[reuse] {summary}", flush=True)
        return json.loads(summary.read_text())
    command = [sys.executable, str(REPO / "run.py"), f"stage={stage}", *args.common, *overrides]
    command += [f"data.subset_seed={args.subset_seed}", f"hydra.run.dir={run_dir}"]
    if args.data_dir is not None:
        command.append(f"paths.data_dir={args.data_dir}")
    print("[run]", " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{stage} failed in {run_dir} (exit {proc.returncode})")
    print(f"[done] {stage} in {time.perf_counter() - start:.0f} s", flush=True)
    return json.loads(summary.read_text())


def pretrain(out: Path, fraction: float | None, args: argparse.Namespace) -> tuple[dict[str, Path], dict]:
    """image_pretrain, then a second image_pretrain per image setting and box_pretrain per box setting (both from
    the first), into `out`; the first image_pretrain on `fraction` of the images when given. Returns the init dir of
    each start and the box_pretrain summaries."""
    seed = [f"seed={args.subset_seed}"]
    image_args = [] if fraction is None else [f"data.fraction={fraction}"]
    image = [f"trainer.max_iters={args.image_iters}", *seed, *image_args, *args.image_args]
    run_stage("image_pretrain", out, image, args)
    inits = {IMAGE_START: out / "image_pretrain"}
    for name, overrides in args.image_settings.items():
        run_stage("image_pretrain", out / name, [*seed, f"stage.init_from={inits[IMAGE_START]}", *overrides], args)
        inits[name] = out / name / "image_pretrain"
    boxes = {}
    for name, overrides in args.box_settings.items():
        box_args = [f"trainer.max_iters={args.box_iters}", *seed, f"stage.init_from={inits[IMAGE_START]}"]
        boxes[name] = run_stage("box_pretrain", out / f"box_{name}", [*box_args, *overrides], args)
        inits[name] = out / f"box_{name}" / "box_pretrain"
    return inits, boxes


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def gain(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of b minus mean of a, and its standard error."""
    (mean_a, sd_a), (mean_b, sd_b) = mean_sd(a), mean_sd(b)
    return mean_b - mean_a, math.sqrt(sd_a**2 / len(a) + sd_b**2 / len(b))


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    out = args.out.resolve()
    starts = [IMAGE_START, *args.image_settings, *args.box_settings]
    if args.backbone_labels == "all":
        shared = pretrain(out / "pretrain", None, args)

    cells = []
    for fraction in args.fractions:
        inits, boxes = (
            shared if args.backbone_labels == "all" else pretrain(out / f"pretrain_f{fraction:g}", fraction, args)
        )
        for iters in args.finetune_iters:
            runs = {start: [] for start in starts}
            for seed in args.seeds:
                # Seed-major order: an interrupted table still has whole seeds for every start.
                for start in starts:
                    name = f"{start}_f{fraction:g}" + (f"_it{iters}" if len(args.finetune_iters) > 1 else "")
                    run_dir = out / f"{name}_s{seed}"
                    finetune = [
                        f"data.fraction={fraction}",
                        f"seed={seed}",
                        f"trainer.max_iters={iters}",
                        f"stage.init_from={inits[start]}",
                        *args.finetune_args,
                    ]
                    ft = run_stage("finetune", run_dir, finetune, args)
                    run_stage("eval", run_dir, [f"stage.init_from={run_dir / 'finetune'}"], args)
                    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())["bbox"]
                    runs[start].append(
                        {"seed": seed, "AP": metrics["AP"], "AP50": metrics["AP50"], "images": ft["num_train_images"]}
                    )
            cells.append({"fraction": fraction, "finetune_iters": iters, "runs": runs})

    box_iters = {name: summary["iterations"] for name, summary in boxes.items()}
    box_text = ""
    if boxes:
        box_images = next(iter(boxes.values()))["num_train_images"]
        box_text = f"box_pretrain {box_iters} iterations on {box_images} images, settings {args.box_settings}; "
    lines = [
        f"{box_text}image_pretrain {args.image_iters} iterations on the labels of {args.backbone_labels} images, "
        f"then image settings {args.image_settings}; finetune seeds {args.seeds} on subset seed {args.subset_seed}; "
        f"overrides {args.common}",
        "",
        "| fraction | images | finetune iters | start | seeds | AP mean +- sd | AP50 mean +- sd | gain AP +- SE | "
        "gain > 2 SE |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in cells:
        image_ap = [r["AP"] for r in cell["runs"][IMAGE_START]]
        for start in starts:
            runs = cell["runs"][start]
            ap, ap50 = mean_sd([r["AP"] for r in runs]), mean_sd([r["AP50"] for r in runs])
            if start == IMAGE_START:
                gain_text, significant = "", ""
            else:
                delta, se = gain(image_ap, [r["AP"] for r in runs])
                gain_text, significant = f"{delta:+.1f} +- {se:.1f}", "yes" if delta > 2 * se else "no"
            lines.append(
                f"| {cell['fraction']:g} | {runs[0]['images']} | {cell['finetune_iters']} | {start} | {len(runs)} | "
                f"{ap[0]:.1f} +- {ap[1]:.1f} | {ap50[0]:.1f} +- {ap50[1]:.1f} | {gain_text} | {significant} |"
            )
    table = "\n".join(lines)
    print("\n" + table)
    (out / "table.md").write_text(table + "\n")
    (out / "table.json").write_text(
        json.dumps({"image_settings": args.image_settings, "settings": args.box_settings, "cells": cells}, indent=1)
        + "\n"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
