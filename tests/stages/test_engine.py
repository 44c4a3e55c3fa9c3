"""The training loop, checkpoints and COCO evaluation on tiny stand-in models (no detector needed)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf, open_dict
from pycocotools.coco import COCO
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from stages.context import StageContext
from stages.engine.checkpoint import LAST_NAME, drop_matches, load_into, save_checkpoint
from stages.engine.coco_eval import evaluate_coco
from stages.engine.optim import build_optimizer, lr_factor, param_groups
from stages.engine.trainer import Hook, total_loss
from stages.errors import UserError
from stages.fingerprint import Fingerprint, make_fingerprint
from tests.helpers import compose_config


class Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(4, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(torch.relu(self.backbone(x)))


def regression_forward(model, batch, device):
    x, y = batch
    return {"toy/loss_mse": ((model(x).squeeze(1) - y) ** 2).mean()}


def toy_context(tmp_path, overrides: list[str], fingerprint: str | None = None) -> StageContext:
    """A StageContext for the toy stage in <tmp_path>/toy, as open_stage would give one, without the dataset."""
    cfg = compose_config(["experiment=smoke", *overrides], run_dir=tmp_path)
    stamp = make_fingerprint("toy", {"seed": 0}, {}) if fingerprint is None else None
    if fingerprint is not None:
        stamp = Fingerprint("toy", fingerprint, {}, {})
    with open_dict(cfg):
        cfg.stage.name = "toy"
    (tmp_path / "toy").mkdir(parents=True, exist_ok=True)
    return StageContext(cfg, tmp_path / "toy", torch.device("cpu"), stamp)


def make_trainer(tmp_path, max_iters=8, hooks=None, log_every=1):
    ctx = toy_context(
        tmp_path,
        [
            f"trainer.max_iters={max_iters}",
            "trainer.checkpoint_every=4",
            f"trainer.log_every={log_every}",
            "trainer.optimizer.lr=0.02",
            "trainer.clip_grad_norm=0",
        ],
    )
    torch.manual_seed(0)
    x = torch.randn(32, 4)
    y = x.sum(1)
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    return ctx.trainer(Regressor(), loader, forward_fn=regression_forward, hooks=hooks or [])


class StopAt(Hook):
    def __init__(self, it):
        self.it = it

    def after_step(self, trainer):
        if trainer.iter == self.it:
            raise KeyboardInterrupt("killed")


def test_resumed_run_continues_from_its_checkpoint_instead_of_starting_over(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        make_trainer(tmp_path, hooks=[StopAt(6)]).train()
    assert torch.load(tmp_path / "toy" / LAST_NAME, weights_only=True)["iter"] == 4
    steps = []
    second = make_trainer(
        tmp_path, hooks=[type("Rec", (Hook,), {"after_step": lambda self, t: steps.append(t.iter)})()]
    )
    second.train()
    assert steps == [5, 6, 7, 8]
    logged = [json.loads(line)["iter"] for line in (tmp_path / "toy" / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 9))  # steps 5-6 of the killed run were dropped, not duplicated


def test_training_loop_lowers_the_loss_and_logs_every_term(tmp_path):
    trainer = make_trainer(tmp_path, max_iters=200, log_every=20)
    trainer.train()
    lines = [json.loads(line) for line in (tmp_path / "toy" / "metrics.jsonl").read_text().splitlines()]
    assert {"iter", "toy/loss_mse", "loss", "lr", "sec_per_iter"} <= set(lines[-1])
    assert lines[-1]["loss"] < 0.5 * lines[0]["loss"]
    ckpt = torch.load(tmp_path / "toy" / LAST_NAME, weights_only=True)
    assert set(ckpt) >= {"model", "optimizer", "scheduler", "iter", "stage", "config", "rng", "fingerprint"}
    assert ckpt["iter"] == 200 and ckpt["config"]["trainer"]["max_iters"] == 200


def test_non_finite_loss_names_the_term():
    with pytest.raises(FloatingPointError, match="detr/loss_giou"):
        total_loss({"detr/loss_cls": torch.tensor(1.0), "detr/loss_giou": torch.tensor(float("nan"))})


def test_statistics_are_logged_but_not_optimised():
    assert float(total_loss({"a/loss_x": torch.tensor(2.0), "a/accuracy": torch.tensor(5.0)})) == 2.0


def test_backbone_lr_multiplier_puts_backbone_in_its_own_group():
    groups = param_groups(Regressor(), lr=1.0, weight_decay=0.0, lr_mults={"backbone": 0.1})
    lrs = sorted(g["lr"] for g in groups)
    assert lrs == [pytest.approx(0.1), 1.0]


def test_warmup_then_step_schedule():
    sched = OmegaConf.create(
        {
            "name": "step",
            "warmup_iters": 10,
            "warmup_factor": 0.0,
            "milestones": [0.5],
            "gamma": 0.1,
            "min_lr_factor": 0.0,
        }
    )
    assert lr_factor(0, 100, sched) == 0.0
    assert lr_factor(5, 100, sched) == pytest.approx(0.5)
    assert lr_factor(20, 100, sched) == 1.0
    assert lr_factor(60, 100, sched) == pytest.approx(0.1)


def test_checkpoint_write_is_atomic_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}})

    def broken_save(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"model": {"w": torch.zeros(2)}})
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], torch.ones(2))
    assert list(tmp_path.iterdir()) == [path]


def test_load_report_counts_loaded_shape_and_name_mismatches(tmp_path):
    source = Regressor()
    state = source.state_dict()
    state["head.weight"] = torch.zeros(3, 8)  # wrong shape
    state["extra.weight"] = torch.zeros(1)  # unknown name
    save_checkpoint(tmp_path / "checkpoint.pth", {"model": state, "stage": "toy"})
    report = load_into(Regressor(), tmp_path)  # a directory resolves to its checkpoint.pth
    assert report.loaded == {"backbone": 2, "head": 1}
    assert report.skipped_shape == {"head": 1} and report.skipped_name == {"extra": 1}
    assert report.fresh == {"head": 1}


def test_drop_patterns_are_substrings_where_a_star_matches_any_run():
    assert drop_matches("class_embed.2.weight", "class_embed.")
    assert drop_matches("aux_heads.0.tower.cls_pred.bias", "tower.cls_pred.")
    assert drop_matches("bbox_embed.5.6.weight", "bbox_embed.*.6.")
    assert not drop_matches("bbox_embed.5.3.weight", "bbox_embed.*.6.")
    assert not drop_matches("enc_bbox_embed.6.weight", "bbox_embed.*.6.")
    assert not drop_matches("enc_class_embed.weight", "class_embed.")
    assert not drop_matches("transformer.encoder.layers.6.norm.weight", "bbox_embed.*.6.")


def test_load_report_lists_the_drop_patterns_of_the_caller_and_the_checkpoint(tmp_path):
    state = Regressor().state_dict()
    save_checkpoint(tmp_path / "checkpoint.pth", {"model": state, "stage": "toy", "drop_keys": ["head.*ight"]})
    report = load_into(Regressor(), tmp_path, drop=["backbone.b"])
    assert report.drop_patterns == ["backbone.b", "head.*ight"]
    assert report.dropped == {"backbone": 1, "head": 1} and report.loaded == {"backbone": 1, "head": 1}
    assert report.as_dict()["drop_patterns"] == report.drop_patterns
    assert report.table().splitlines()[-1] == "dropped by: backbone.b, head.*ight"
    whole = load_into(Regressor(), tmp_path, checkpoint_drops=False)
    assert whole.drop_patterns == [] and whole.loaded == {"backbone": 2, "head": 2}


def test_checkpoint_that_fits_nothing_is_refused(tmp_path):
    save_checkpoint(tmp_path / "other.pth", {"model": {"foo.weight": torch.zeros(1)}, "stage": "x"})
    with pytest.raises(UserError, match="other.pth: none of its 1 tensors fit"):
        load_into(Regressor(), tmp_path / "other.pth")


def test_missing_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        load_into(Regressor(), tmp_path / "nope.pth")


def test_ground_truth_as_predictions_gives_ap_100():
    gt = COCO()
    gt.dataset = {
        "images": [{"id": 1, "width": 100, "height": 80}, {"id": 2, "width": 120, "height": 90}],
        "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 30, 20], "area": 600, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [50, 40, 40, 35], "area": 1400, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 7, "bbox": [5, 5, 100, 80], "area": 8000, "iscrowd": 0},
        ],
    }
    gt.createIndex()
    results = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in gt.dataset["annotations"]
    ]
    metrics = evaluate_coco(gt, results, [1, 2], ["a", "b"], [3, 7])
    assert metrics["AP"] == pytest.approx(100.0) and metrics["AP50"] == pytest.approx(100.0)
    assert metrics["per_class"] == {"a": pytest.approx(100.0), "b": pytest.approx(100.0)}
    shifted = [{**r, "bbox": [r["bbox"][0] + 8, *r["bbox"][1:]]} for r in results]
    assert evaluate_coco(gt, shifted, [1, 2], ["a", "b"], [3, 7])["AP"] < 100.0


class NoisyRegressor(Regressor):
    """Draws from torch, numpy and python's generators every step, so a resume that restores any of them wrongly
    logs other losses."""

    def forward(self, x):
        import random

        import numpy as np

        noise = torch.rand(1).item() + float(np.random.rand()) + random.random()
        return super().forward(torch.nn.functional.dropout(x, 0.3, self.training)) + noise


def make_resumable_trainer(tmp_path, fingerprint="f" * 64, hooks=None, lr=0.02):
    from torch.utils.data import default_collate

    from stages.data.build import build_loader

    overrides = [
        "trainer.max_iters=10",
        "trainer.checkpoint_every=3",
        "trainer.log_every=2",
        f"trainer.optimizer.lr={lr}",
    ]
    ctx = toy_context(tmp_path, overrides, fingerprint=fingerprint)
    torch.manual_seed(0)
    x = torch.randn(12, 4)
    dataset = TensorDataset(x, x.sum(1))
    # 3 batches per epoch: the kill and the resume fall in the middle of an epoch.
    loader = build_loader(
        dataset, 4, 0, shuffle=True, seed=5, distributed=False, drop_last=True, collate_fn=default_collate
    )
    return ctx.trainer(NoisyRegressor(), loader, forward_fn=regression_forward, hooks=hooks or [])


def logged_losses(stage_dir) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return [(line["iter"], line["toy/loss_mse"]) for line in lines]


def test_a_resumed_run_logs_the_same_losses_as_an_uninterrupted_one(tmp_path):
    from stages.common import seed_everything

    seed_everything(1)
    make_resumable_trainer(tmp_path / "whole").train()
    seed_everything(1)
    with pytest.raises(KeyboardInterrupt):
        make_resumable_trainer(tmp_path / "killed", hooks=[StopAt(8)]).train()
    seed_everything(123)  # a restart seeds afresh; the resumed state must not depend on it
    make_resumable_trainer(tmp_path / "killed").train()
    whole, resumed = logged_losses(tmp_path / "whole" / "toy"), logged_losses(tmp_path / "killed" / "toy")
    assert [i for i, _ in resumed] == [2, 4, 6, 8, 10]
    assert resumed == whole


def test_resuming_under_another_fingerprint_is_refused(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        make_resumable_trainer(tmp_path, hooks=[StopAt(4)]).train()
    with pytest.raises(UserError, match="last.pth: written by a run with fingerprint f+, not this run's 0+"):
        make_resumable_trainer(tmp_path, fingerprint="0" * 64).train()


def test_a_torn_last_metrics_line_is_dropped_with_a_warning_on_resume(tmp_path, caplog):
    import logging

    with pytest.raises(KeyboardInterrupt):
        make_resumable_trainer(tmp_path, hooks=[StopAt(4)]).train()
    metrics = tmp_path / "toy" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"iter": 5, "loss": 0.1')  # killed mid-append
    with caplog.at_level(logging.WARNING):
        make_resumable_trainer(tmp_path).train()
    assert "not valid JSON" in caplog.text
    assert [i for i, _ in logged_losses(tmp_path / "toy")] == [2, 4, 6, 8, 10]


def test_epochs_that_give_no_iteration_are_refused(tmp_path):
    ctx = toy_context(tmp_path, ["trainer.epochs=0"])
    loader = DataLoader(TensorDataset(torch.randn(64, 4), torch.randn(64)), batch_size=8)
    with pytest.raises(UserError, match=r"^trainer.epochs: 0 x 8 batches per epoch gives 0 iterations"):
        ctx.trainer(Regressor(), loader, forward_fn=regression_forward)


def test_weights_only_loading_refuses_a_checkpoint_that_unpickles_code(tmp_path):
    from stages.engine.checkpoint import read_checkpoint

    path = tmp_path / "crafted.pth"
    torch.save({"model": {}, "payload": Regressor()}, path)  # any non-tensor object needs a full unpickle
    with pytest.raises(UserError, match=r"crafted.pth: refused: loading it would unpickle objects"):
        read_checkpoint(path)


@pytest.mark.parametrize("amp_dtype,scaled", [("bf16", False), ("fp16", True)])
def test_mixed_precision_trains_on_cpu_and_scales_gradients_only_for_fp16(tmp_path, amp_dtype, scaled):
    ctx = toy_context(tmp_path, ["trainer.max_iters=3", f"trainer.amp_dtype={amp_dtype}", "trainer.log_every=1"])
    loader = DataLoader(TensorDataset(torch.randn(16, 4), torch.randn(16)), batch_size=4)
    trainer = ctx.trainer(Regressor(), loader, forward_fn=regression_forward)
    assert trainer.scaler.is_enabled() == scaled
    result = trainer.train()
    assert result["iter"] == 3 and math.isfinite(result["final_losses"]["loss"])


def test_an_unknown_amp_dtype_is_refused(tmp_path):
    ctx = toy_context(tmp_path, ["trainer.amp_dtype=fp8"])
    loader = DataLoader(TensorDataset(torch.randn(16, 4), torch.randn(16)), batch_size=4)
    with pytest.raises(UserError, match=r"^trainer.amp_dtype: 'fp8'; expected one of \[None, 'bf16', 'fp16'\]"):
        ctx.trainer(Regressor(), loader, forward_fn=regression_forward)


@pytest.mark.parametrize(("name", "kind"), [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)])
def test_optimizer_family_comes_from_the_config(name, kind):
    cfg = OmegaConf.create(
        {"name": name, "lr": 0.1, "weight_decay": 0.0, "betas": [0.9, 0.999], "momentum": 0.9, "fused": True}
    )
    optimizer = build_optimizer(Regressor(), cfg)
    assert isinstance(optimizer, kind) and optimizer.param_groups[0]["lr"] == 0.1
    if name == "sgd":
        assert optimizer.param_groups[0]["momentum"] == 0.9


def test_unknown_optimizer_is_a_user_error():
    cfg = OmegaConf.create({"name": "lamb", "lr": 0.1, "weight_decay": 0.0})
    with pytest.raises(UserError, match="trainer.optimizer.name: unknown optimizer 'lamb'; expected one of adamw, sgd"):
        build_optimizer(Regressor(), cfg)
