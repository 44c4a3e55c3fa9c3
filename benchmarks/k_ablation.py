"""Co-DETR's K ablation in miniature (paper Table 7): fine-tune K = 0..4 auxiliary heads at equal iterations.

    python benchmarks/k_ablation.py [--ks 0 1 2 3 4] [--init-from PATH] [--out outputs/k_ablation] [overrides]
    python benchmarks/k_ablation.py --ks 0 2 --init-from outputs/run/box_pretrain trainer.max_iters=200

Each K is `python run.py stage=finetune model=co_deformable_detr model.num_aux_heads=K [stage.init_from=PATH]
<overrides>` in its own process and run directory (`<out>/k<K>`), then evaluated (finetune's own evaluation, or
`stage=eval` when that is off). A finished K is reused, so an interrupted sweep resumes. Every K gets the same
seed, data order, initial DETR weights and starting checkpoint (`--init-from`: e.g. the default pipeline's
box_pretrain or image_pretrain output; none = from scratch). Defaults: the synthetic dataset, the default CPU
preset and trainer budget. `--stage pipeline` runs the whole pipeline per K instead (its pre-training too).
Prints one table: COCO AP and AP50 on the val split, seconds per training iteration (finetune wall time /
iterations, logging and checkpoints included) and the training process's peak resident set size (os.wait4
ru_maxrss: host memory of the whole process).
Paper (Deformable-DETR++ R50, 12 epochs): K=0 47.1, K=1 (ATSS) 48.7, K=2 (+ Faster R-CNN) 49.5 AP.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent


def run_logged(command: list[str], run_dir: Path) -> float:
    """Run `command`, appending its output to <run_dir>/k_ablation.log; returns its peak RSS in MiB."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "k_ablation.log", "a") as log:
        proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak memory, not all children's
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(command[1:4])}... failed; see {run_dir / 'k_ablation.log'}")
    return usage.ru_maxrss / 1024  # Linux reports KiB


def run_k(k: int, stage: str, init_from: str | None, run_dir: Path, overrides: list[str]) -> dict:
    """Train (and evaluate) K heads; returns its numbers."""
    base = [sys.executable, str(REPO / "run.py"), "model=co_deformable_detr", f"model.num_aux_heads={k}"]
    base += [f"hydra.run.dir={run_dir}", *overrides]
    init = [f"stage.init_from={init_from}"] if init_from else []
    summary_path = run_dir / "finetune" / "summary.json"
    reused = summary_path.is_file()  # finetune skips a finished run: its process trains nothing
    peak = run_logged(base + [f"stage={stage}", *init], run_dir)
    if not (run_dir / "eval" / "metrics.json").is_file():
        run_logged(base + ["stage=eval"], run_dir)
    finetune = json.loads(summary_path.read_text())
    bbox = json.loads((run_dir / "eval" / "metrics.json").read_text())["bbox"]
    config = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    return {
        "k": k,
        "heads": list(config.model.aux_heads[:k]),
        "AP": bbox["AP"],
        "AP50": bbox["AP50"],
        "iterations": finetune["iterations"],
        "sec_per_iter": finetune["train_seconds"] / max(1, finetune["iterations"]),
        "peak_rss_mib": None if reused else peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--init-from", default=None, help="checkpoint or stage directory every K starts from")
    parser.add_argument("--stage", choices=["finetune", "pipeline"], default="finetune")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "k_ablation")
    args, overrides = parser.parse_known_args()
    init_from = str(Path(args.init_from).resolve()) if args.init_from else None

    rows = [run_k(k, args.stage, init_from, args.out.resolve() / f"k{k}", overrides) for k in args.ks]
    base = next((r for r in rows if r["k"] == 0), None)
    print(
        f"Co-DETR K ablation: stage={args.stage}, {rows[0]['iterations']} iterations each, "
        f"init_from {init_from or 'none'}, overrides {overrides or 'none'}"
    )
    print(f"{'K':>2}  {'heads':<36}{'AP':>7}{'AP50':>7}{'dAP':>7}{'s/iter':>8}{'peak RSS MiB':>14}")
    for r in rows:
        delta = f"{r['AP'] - base['AP']:>+7.1f}" if base else f"{'':>7}"
        peak = f"{r['peak_rss_mib']:>14.0f}" if r["peak_rss_mib"] is not None else f"{'(reused)':>14}"
        print(
            f"{r['k']:>2}  {'+'.join(r['heads']) or '-':<36}{r['AP']:>7.1f}{r['AP50']:>7.1f}{delta}"
            f"{r['sec_per_iter']:>8.2f}{peak}"
        )


if __name__ == "__main__":
    main()
