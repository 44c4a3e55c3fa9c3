"""`stage=finetune stage.init_from=<box_pretrain dir>`: the online weights go on, the classifiers do not, and the load
report lands in finetune/summary.json."""

from __future__ import annotations

import json

from tests.helpers import run_cli


def test_finetune_from_box_pretrain_reports_loaded_and_dropped_tensors(tmp_path, data_dir):
    proc = run_cli(["experiment=smoke", "stage=box_pretrain"], tmp_path, data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli(
        ["experiment=smoke", "stage=finetune", f"stage.init_from={tmp_path / 'box_pretrain'}"], tmp_path, data_dir
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    init = json.loads((tmp_path / "finetune" / "summary.json").read_text())["init"]
    assert init["source"].endswith("box_pretrain/checkpoint.pth")
    for module in ("backbone", "neck", "transformer", "bbox_embed"):
        assert init["loaded"][module] > 0, module
    assert init["dropped"]["class_embed"] > 0
    # only what was dropped (the classifiers: DETR class heads, auxiliary heads' classifiers) starts fresh
    assert init["fresh"] == init["dropped"]
