"""`python run.py experiment=smoke stage=box_pretrain` for the DETR family, and its checkpoint seeding finetune."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stages.build import build_model
from stages.engine.checkpoint import load_into
from tests.helpers import CONF_DIR, assert_one_line_error, compose_config, run_cli

DETR_MODELS = [
    pytest.param(
        name,
        marks=pytest.mark.skipif(not (CONF_DIR / "model" / f"{name}.yaml").is_file(), reason=f"no model={name} yet"),
    )
    for name in ("deformable_detr", "co_deformable_detr")
]


@pytest.fixture(scope="module")
def box_pretrain_runs(tmp_path_factory, data_dir):
    """One smoke box_pretrain run per model, on demand."""
    runs: dict[str, Path] = {}

    def get(model: str) -> Path:
        if model not in runs:
            run_dir = tmp_path_factory.mktemp(f"box_pretrain_{model}")
            proc = run_cli(["experiment=smoke", "stage=box_pretrain", f"model={model}"], run_dir, data_dir)
            assert proc.returncode == 0, proc.stderr[-3000:]
            runs[model] = run_dir
        return runs[model]

    return get


def finetune_model(model: str, run_dir: Path) -> torch.nn.Module:
    cfg = compose_config(["experiment=smoke", f"model={model}", "stage=finetune"], run_dir)
    return build_model(cfg.model, len(cfg.data.generator.classes))


@pytest.mark.parametrize("model", DETR_MODELS)
def test_box_pretrain_writes_the_online_detector_and_proposal_stats(box_pretrain_runs, model):
    run_dir = box_pretrain_runs(model)
    out = run_dir / "box_pretrain"
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["stage"] == "box_pretrain" and ckpt["iter"] == ckpt["config"]["trainer"]["max_iters"]
    # checkpoint.pth: exactly the detector's own keys (no projectors, no momentum copy).
    assert set(ckpt["model"]) == set(finetune_model(model, run_dir).state_dict())
    assert ckpt["drop_keys"] and all(isinstance(k, str) for k in ckpt["drop_keys"])
    # last.pth: the whole wrapper, for resuming.
    last = torch.load(out / "last.pth", weights_only=True)["model"]
    assert any(k.startswith("momentum_detector.") for k in last) and any(k.startswith("projectors.") for k in last)

    summary = json.loads((out / "summary.json").read_text())
    stats = summary["proposals"]
    assert stats["images_per_second"] > 0 and stats["num_skipped"] >= 0 and isinstance(stats["cache_hit"], bool)
    assert stats["per_image_limit"] == ckpt["config"]["model"]["num_queries"]  # smoke: 10 queries < 50 proposals
    assert summary["iterations"] == ckpt["iter"]
    assert "align/loss_contrastive_detr" in summary["metrics"]
    assert not any(k.endswith("loss_cls") for k in summary["metrics"])
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"iter", "loss", "lr", "sec_per_iter"} <= set(first)


@pytest.mark.parametrize("model", DETR_MODELS)
def test_box_pretrained_checkpoint_loads_neck_transformer_and_heads_but_not_classifiers(box_pretrain_runs, model):
    run_dir = box_pretrain_runs(model)
    target = finetune_model(model, run_dir)
    state = target.state_dict()
    report = load_into(target, run_dir / "box_pretrain")
    count = {m: sum(1 for k in state if k.split(".", 1)[0] == m) for m in {k.split(".", 1)[0] for k in state}}
    for module in ("backbone", "neck", "transformer", "query_embed"):
        assert report.loaded.get(module) == count[module], module
    assert report.dropped["class_embed"] == count["class_embed"]
    assert report.fresh.get("class_embed") == count["class_embed"]
    # The last Linear (weight, bias) of every decoder layer's box MLP starts afresh, the rest of the MLP goes on.
    num_layers = len(target.bbox_embed)
    assert report.dropped["bbox_embed"] == report.fresh["bbox_embed"] == 2 * num_layers
    assert report.loaded["bbox_embed"] == count["bbox_embed"] - 2 * num_layers
    assert "class_embed." in report.drop_patterns and "bbox_embed.*.6." in report.drop_patterns
    assert "dropped by: " in report.table()
    assert not report.skipped_shape and not report.skipped_name
    if model == "co_deformable_detr":
        # Auxiliary heads: everything but their classifiers.
        assert 0 < report.loaded["aux_heads"] < count["aux_heads"]
        assert report.fresh["aux_heads"] == report.dropped["aux_heads"]
        assert report.loaded["adapter"] == count["adapter"]
    assert set(report.fresh) <= {"class_embed", "bbox_embed", "aux_heads"}


# ---- pseudo-classes (stage.pseudo_classes) ----

NUM_CLUSTERS = 4


def test_box_pretrain_with_pseudo_classes_trains_the_class_heads_and_finetune_drops_them(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    args = [
        "experiment=smoke",
        "stage=box_pretrain",
        "model=co_deformable_detr",
        "stage.pseudo_classes.enabled=true",
        f"stage.pseudo_classes.num_clusters={NUM_CLUSTERS}",
    ]
    proc = run_cli(args, run_dir, data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = run_dir / "box_pretrain"
    summary = json.loads((out / "summary.json").read_text())
    assert {"detr/loss_cls", "detr/loss_cls_d0", "detr/loss_bbox"} <= set(summary["metrics"])
    assert not any(k.startswith("aux") and k.endswith("loss_cls") for k in summary["metrics"])
    clusters = summary["pseudo_classes"]
    assert clusters["num_clusters"] == NUM_CLUSTERS and sum(clusters["cluster_sizes"]) == clusters["num_proposals"]
    # Cached beside the proposals.
    assert Path(clusters["cache_path"]).parent == Path(summary["proposals"]["cache_path"]).parent
    assert Path(clusters["cache_path"]).is_file()

    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["model"]["class_embed.0.weight"].shape[0] == NUM_CLUSTERS
    assert any(k.startswith("class_embed.") for k in ckpt["drop_keys"])
    target = finetune_model("co_deformable_detr", run_dir)
    count = sum(1 for k in target.state_dict() if k.startswith("class_embed."))
    report = load_into(target, out)
    assert report.dropped["class_embed"] == count and report.fresh["class_embed"] == count
    assert not report.skipped_shape and not report.skipped_name


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["stage.aligndet.detr_objectness=true"], ("stage.pseudo_classes.enabled", "stage.aligndet.detr_objectness")),
        (["model=fcos"], ("stage.pseudo_classes.enabled=true", "model=fcos", "DETR")),
    ],
)
def test_pseudo_classes_config_errors_are_one_line(tmp_path, data_dir, extra, fragments):
    args = ["experiment=smoke", "stage=box_pretrain", "stage.pseudo_classes.enabled=true", *extra]
    proc = run_cli(args, tmp_path / "run", data_dir)
    assert_one_line_error(proc, *fragments)
