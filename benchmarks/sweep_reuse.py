"""Wall time of a pipeline sweep over K and the data fraction, and how many times each stage ran.

    python benchmarks/sweep_reuse.py --out DIR [--repo CHECKOUT] [hydra overrides ...]

Runs `python run.py -m model.num_aux_heads=0,2 data.fraction=0.1,1.0 <overrides>` (the whole pipeline per job)
from `--repo` (default: this checkout; pass an older checkout, e.g. a `git worktree` of an earlier commit, to
measure before and after with the same command), into DIR/sweep with the stage store under DIR/outputs, then
prints the wall time and, per stage, how many of the jobs computed it (`computed`, or `done` in pipeline.json
files written before the stage store) and how many reused it.

The default overrides are a small preset: the smoke model and data, 20 iterations per training stage, and the
label-free image pre-training (the stage's own default, MoCo v3), so that image_pretrain reads neither K nor the
fraction. The default pipeline's supervised crop classifier reads the labels of the fraction's images, so with it
image_pretrain (and the box_pretrain that starts from it) is rightly computed once per fraction.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SWEEP = ["-m", "model.num_aux_heads=0,2", "data.fraction=0.1,1.0"]
PRESET = ["experiment=smoke", "trainer.max_iters=20", "stage.overrides.image_pretrain=[]"]
STAGES = ("image_pretrain", "box_pretrain", "finetune", "eval")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where the sweep and the stage store are written")
    parser.add_argument("--repo", type=Path, default=ROOT, help="the checkout whose run.py runs the sweep")
    parser.add_argument("--data-dir", type=Path, default=None, help="paths.data_dir (default: DIR/data)")
    parser.add_argument("overrides", nargs="*", help=f"Hydra overrides instead of the preset {PRESET}")
    args = parser.parse_args()
    out = args.out.resolve()
    data_dir = (args.data_dir or out / "data").resolve()
    command = [
        sys.executable,
        str(args.repo.resolve() / "run.py"),
        *SWEEP,
        *(args.overrides or PRESET),
        f"hydra.sweep.dir={out / 'sweep'}",
        f"paths.output_dir={out / 'outputs'}",
        f"paths.data_dir={data_dir}",
    ]
    print("$", " ".join(command), flush=True)
    env = {**os.environ, "WANDB_MODE": "disabled"}
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=args.repo.resolve(), env=env, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"sweep failed with exit code {proc.returncode}")

    computed, reused = Counter(), Counter()
    jobs = sorted(p for p in (out / "sweep").iterdir() if (p / "pipeline.json").is_file())
    for job in jobs:
        for stage in json.loads((job / "pipeline.json").read_text())["stages"]:
            if stage["status"] in ("computed", "done"):
                computed[stage["name"]] += 1
            else:
                reused[stage["name"]] += 1
    print(f"\nrepo: {args.repo.resolve()}  jobs: {len(jobs)}  wall: {seconds:.1f} s ({seconds / 60:.1f} min)")
    print(f"{'stage':<16}{'computed':>10}{'reused':>8}")
    for name in STAGES:
        print(f"{name:<16}{computed[name]:>10}{reused[name]:>8}")


if __name__ == "__main__":
    main()
