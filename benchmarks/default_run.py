"""Time the default job (`python run.py`, the whole pipeline on the synthetic dataset) and print its AP table.

    python benchmarks/default_run.py [--run-dir DIR] [hydra overrides ...]

Prints wall-clock seconds in total and per stage (from pipeline.json) and the eval metrics. The goal for the
default: under 15 minutes on a 2-core CPU with AP50 >= 50 on the synthetic val split.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=None, help="where the run writes (default: a temp dir)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. model.num_aux_heads=0")
    args = parser.parse_args()
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="default_run_"))
    command = [sys.executable, str(ROOT / "run.py"), f"hydra.run.dir={run_dir}", *args.overrides]
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"run failed with exit code {proc.returncode}")
    pipeline = json.loads((run_dir / "pipeline.json").read_text())
    bbox = json.loads((run_dir / "eval" / "metrics.json").read_text())["bbox"]
    print(f"\nrun dir: {run_dir}")
    print(f"{'stage':<16}{'status':>8}{'seconds':>10}")
    for stage in pipeline["stages"]:
        print(f"{stage['name']:<16}{stage['status']:>8}{stage['seconds']:>10.1f}")
    print(f"{'total (wall)':<16}{'':>8}{seconds:>10.1f}  ({seconds / 60:.1f} min)\n")
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    print(" | ".join(f"{n:>6}" for n in names))
    print(" | ".join(f"{bbox[n]:6.2f}" for n in names))


if __name__ == "__main__":
    main()
