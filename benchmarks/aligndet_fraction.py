"""AlignDet's data-fraction table in miniature: fine-tune on a fraction of the labelled images starting from
(a) the image-domain backbone only or (b) the box-pretrained detector, with the same fine-tuning budget.

    python benchmarks/aligndet_fraction.py --out DIR [--fractions 0.05 0.1 1.0] [--image-iters N] [--box-iters N]
        [--finetune-iters N [N ...]] [--data-dir DIR] [--backbone-labels all|fraction] [--image-args ...]
        [--box-args ...] [--finetune-args ...] [-- overrides]

Every step is a `python run.py` subprocess, in this order:
1. `stage=image_pretrain` (BYOL on the training images by default) -> DIR/pretrain/image_pretrain;
2. `stage=box_pretrain stage.init_from=DIR/pretrain/image_pretrain` -> DIR/pretrain/box_pretrain
   (labels unused: AlignDet on all training images);
3. for each fraction f and start s in {image, box}: `stage=finetune data.fraction=f stage.init_from=<s's dir>`
   then `stage=eval`, in DIR/<s>_f<f>/ (DIR/<s>_f<f>_it<n>/ when --finetune-iters lists several budgets: one row
   per fraction and budget, to see how the gain changes with the fine-tuning length).
With `--backbone-labels fraction`, steps 1 and 2 run once per fraction, in DIR/pretrain_f<f>/, and image_pretrain
gets `data.fraction=f`: a supervised image-domain backbone then sees only the labels that fraction fine-tunes on,
as in the paper, where the backbone never saw the detection labels. box_pretrain still reads every training image
(it uses no labels). `all` (the default) pre-trains once on every image, labels included when the method uses them.
The overrides after `--` go to every run (e.g. `model=co_deformable_detr trainer.batch_size=4`); --image-args,
--box-args and --finetune-args go to that stage only (e.g. `--box-args trainer.optimizer.lr=1e-4`). A step whose
summary.json already exists is reused, so an interrupted table resumes. Prints AP and AP50 (COCO, percent) per
cell and the gain of (b) over (a); the table is also written to DIR/table.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STARTS = ("image", "box")


def parse_args(argv: list[str]) -> argparse.Namespace:
    if "--" in argv:
        split = argv.index("--")
        argv, common = argv[:split], argv[split + 1 :]
    else:
        common = []
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for every run and the table")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1, 1.0])
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
    p.add_argument("--box-args", nargs="*", default=[], help="overrides for box_pretrain only")
    p.add_argument("--finetune-args", nargs="*", default=[], help="overrides for finetune only")
    args = p.parse_args(argv)
    args.common = common
    return args


def run_stage(stage: str, run_dir: Path, overrides: list[str], args: argparse.Namespace) -> dict:
    """`python run.py stage=<stage> ...` into run_dir (skipped when its summary exists); returns the summary."""
    summary = run_dir / stage / "summary.json"
    if summary.exists():
        print(f"[reuse] {summary}", flush=True)
        return json.loads(summary.read_text())
    command = [sys.executable, str(REPO / "run.py"), f"stage={stage}", *args.common, *overrides]
    command.append(f"hydra.run.dir={run_dir}")
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
    """image_pretrain then box_pretrain into `out`; image_pretrain on `fraction` of the images when given.
    Returns the init dir of each start and box_pretrain's summary."""
    image_args = [] if fraction is None else [f"data.fraction={fraction}"]
    run_stage("image_pretrain", out, [f"trainer.max_iters={args.image_iters}", *image_args, *args.image_args], args)
    image_dir = out / "image_pretrain"
    box = run_stage(
        "box_pretrain",
        out,
        [f"trainer.max_iters={args.box_iters}", f"stage.init_from={image_dir}", *args.box_args],
        args,
    )
    return {"image": image_dir, "box": out / "box_pretrain"}, box


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    out = args.out.resolve()
    if args.backbone_labels == "all":
        shared = pretrain(out / "pretrain", None, args)

    rows = []
    for fraction in args.fractions:
        if args.backbone_labels == "all":
            inits, box = shared
        else:
            inits, box = pretrain(out / f"pretrain_f{fraction:g}", fraction, args)
        for iters in args.finetune_iters:
            cell = {}
            for start in STARTS:
                name = f"{start}_f{fraction:g}" + (f"_it{iters}" if len(args.finetune_iters) > 1 else "")
                run_dir = out / name
                ft = run_stage(
                    "finetune",
                    run_dir,
                    [
                        f"data.fraction={fraction}",
                        f"trainer.max_iters={iters}",
                        f"stage.init_from={inits[start]}",
                        *args.finetune_args,
                    ],
                    args,
                )
                run_stage("eval", run_dir, [f"stage.init_from={run_dir / 'finetune'}"], args)
                metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())["bbox"]
                cell[start] = (metrics["AP"], metrics["AP50"], ft["num_train_images"])
            rows.append((fraction, iters, cell))

    lines = [
        f"box_pretrain: {box['iterations']} iterations on {box['num_train_images']} images; image_pretrain "
        f"{args.image_iters} iterations on the labels of {args.backbone_labels} images; overrides {args.common}",
        "",
        "| fraction | images | finetune iters | AP (a) image | AP (b) box | gain AP | AP50 (a) | AP50 (b) | gain AP50 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for fraction, iters, cell in rows:
        (ap_a, ap50_a, n), (ap_b, ap50_b, _) = cell["image"], cell["box"]
        lines.append(
            f"| {fraction:g} | {n} | {iters} | {ap_a:.1f} | {ap_b:.1f} | {ap_b - ap_a:+.1f} | {ap50_a:.1f} | "
            f"{ap50_b:.1f} | {ap50_b - ap50_a:+.1f} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    (out / "table.md").write_text(table + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
