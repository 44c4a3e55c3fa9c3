"""Stage fingerprints: unchanged by where things are written and how they are logged, changed by every key a
stage reads, by its input checkpoint and by its data; a stage leaves out what it provably does not read."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from stages.engine.checkpoint import checkpoint_payload, save_checkpoint
from stages.fingerprint import NEVER_READ, _under, flatten, stage_fingerprint
from tests.helpers import compose_config


def fingerprint(data_dir, *overrides: str, stage: str = "finetune"):
    cfg = compose_config(["experiment=smoke", f"stage={stage}", f"paths.data_dir={data_dir}", *overrides])
    return stage_fingerprint(cfg)


def test_output_paths_logging_and_progress_cadence_leave_the_fingerprint_unchanged(data_dir, tmp_path):
    base = fingerprint(data_dir)
    same = fingerprint(
        data_dir,
        f"paths.output_dir={tmp_path}/elsewhere",
        f"paths.stage_dir={tmp_path}/stage",
        "logger=wandb",
        "trainer.log_every=7",
        "trainer.checkpoint_every=3",
    )
    assert same.digest == base.digest


def trainer_keys(data_dir) -> list[tuple[str, object]]:
    """Every trainer leaf the fingerprint keeps, with a different value of the same type."""
    cfg = compose_config(["experiment=smoke", "stage=finetune", f"paths.data_dir={data_dir}"])
    changed = []
    for key, value in flatten({"trainer": OmegaConf.to_container(cfg.trainer, resolve=True)}).items():
        if _under(key, NEVER_READ) or isinstance(value, list | dict) or key == "trainer.device":
            continue
        if isinstance(value, bool):
            new = not value
        elif isinstance(value, int | float):
            new = value * 2 + 1
        elif value is None:
            new = 1
        else:
            new = {"step": "cosine", "cosine": "step", "auto": "gloo"}.get(value, value + "x")
        changed.append((key, new))
    return changed


def test_every_training_key_changes_the_finetune_fingerprint_and_is_named(data_dir):
    base = fingerprint(data_dir)
    keys = trainer_keys(data_dir)
    assert {"trainer.optimizer.lr", "trainer.max_iters", "trainer.batch_size", "trainer.num_workers"} <= dict(
        keys
    ).keys()
    for key, value in keys:
        other = fingerprint(data_dir, f"{key}={value}")
        assert other.digest != base.digest, key
        assert key in base.differences(other), key
    for override in ("seed=7", "model.num_aux_heads=1", "data.fraction=0.5", "data.subset_seed=3", "model.d_model=64"):
        assert fingerprint(data_dir, override).digest != base.digest, override


def test_label_free_stages_leave_out_the_label_fraction_and_image_pretrain_the_detector(data_dir):
    for stage in ("box_pretrain", "image_pretrain"):
        base = fingerprint(data_dir, stage=stage)
        assert fingerprint(data_dir, "data.fraction=0.5", stage=stage).digest == base.digest, stage
        assert fingerprint(data_dir, "data.subset_seed=3", stage=stage).digest == base.digest, stage
        assert fingerprint(data_dir, "trainer.optimizer.lr=0.5", stage=stage).digest != base.digest, stage
    # The supervised crop classifier reads the labels: the fraction is its input.
    supervised = fingerprint(data_dir, "stage.method=supervised", stage="image_pretrain")
    changed = fingerprint(data_dir, "stage.method=supervised", "data.fraction=0.5", stage="image_pretrain")
    assert changed.digest != supervised.digest
    image = fingerprint(data_dir, stage="image_pretrain")
    detector_only = fingerprint(data_dir, "model.num_aux_heads=0", "model.num_queries=7", stage="image_pretrain")
    assert detector_only.digest == image.digest
    box = fingerprint(data_dir, stage="box_pretrain")
    assert fingerprint(data_dir, "model.num_aux_heads=0", stage="box_pretrain").digest != box.digest


def test_every_pseudo_class_key_changes_the_box_pretrain_fingerprint_and_is_named(data_dir):
    base = fingerprint(data_dir, stage="box_pretrain")
    for key, value in (
        ("enabled", "true"),
        ("num_clusters", "7"),
        ("kmeans_iters", "9"),
        ("feature_stride", "16"),
        ("roi_output_size", "3"),
        ("sampling_ratio", "1"),
    ):
        other = fingerprint(data_dir, f"stage.pseudo_classes.{key}={value}", stage="box_pretrain")
        assert other.digest != base.digest, key
        assert f"stage.pseudo_classes.{key}" in base.differences(other), key


def test_the_input_checkpoint_enters_by_its_fingerprint_not_its_path(data_dir, tmp_path):
    def write(name: str, weight: float, recorded: str | None) -> str:
        path = tmp_path / name
        state = {"w": torch.full((2,), weight)}
        save_checkpoint(path, checkpoint_payload(state, stage="x", iteration=1, config={}, fingerprint=recorded))
        return str(path)

    a = fingerprint(data_dir, f"stage.init_from={write('a.pth', 1.0, None)}")
    b = fingerprint(data_dir, f"stage.init_from={write('b.pth', 2.0, None)}")
    a_copy = fingerprint(data_dir, f"stage.init_from={write('a_copy.pth', 1.0, None)}")
    assert a.digest != b.digest and a.digest == a_copy.digest  # by content when the file records no fingerprint
    assert "inputs.init.sha256" in a.differences(b)
    recorded = fingerprint(data_dir, f"stage.init_from={write('c.pth', 3.0, 'f' * 64)}")
    moved = fingerprint(data_dir, f"stage.init_from={write('d.pth', 3.0, 'f' * 64)}")
    assert recorded.digest == moved.digest and recorded.inputs["init"]["fingerprint"] == "f" * 64


def test_the_training_data_enters_by_content(data_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(data_dir / "synthetic", copy / "synthetic")
    base = fingerprint(data_dir, f"data.root={copy / 'synthetic'}")
    annotations = copy / "synthetic" / "annotations" / "train.json"
    annotations.write_text(annotations.read_text().replace('"iscrowd": 0', '"iscrowd":0'))
    edited = fingerprint(data_dir, f"data.root={copy / 'synthetic'}")
    assert edited.differences(base) == ["inputs.data.train.annotations"]


@pytest.mark.parametrize("stage", ["image_pretrain", "box_pretrain", "finetune", "eval"])
def test_the_fingerprint_record_reads_back_equal(data_dir, tmp_path, stage):
    import json

    from stages.fingerprint import FINGERPRINT_FILE, read_fingerprint

    checkpoint = tmp_path / "c.pth"
    save_checkpoint(checkpoint, checkpoint_payload({}, stage="x", iteration=0, config={}, fingerprint="a" * 64))
    made = fingerprint(data_dir, f"stage.init_from={checkpoint}", stage=stage)
    (tmp_path / FINGERPRINT_FILE).write_text(json.dumps(made.as_dict()))
    again = read_fingerprint(tmp_path)
    assert again.digest == made.digest and again.differences(made) == []
