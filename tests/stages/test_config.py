"""Every stage's config composes, alone and with experiment=smoke and a user's COCO data."""

import pytest
from omegaconf import OmegaConf

from stages import STAGE_MODULES
from tests.helpers import compose_config

STAGE_CONFIGS = ["finetune", "eval", "pipeline"]


@pytest.mark.parametrize("stage", STAGE_CONFIGS)
def test_every_stage_config_composes_and_resolves(stage):
    cfg = compose_config([f"stage={stage}"])
    assert cfg.stage.name in STAGE_MODULES
    OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("stage", STAGE_CONFIGS)
def test_smoke_composes_with_user_coco_data(stage):
    cfg = compose_config(
        [f"stage={stage}", "experiment=smoke", "data=coco", "data.root=/somewhere", "data.train_json=a.json"]
    )
    assert cfg.data.name == "coco"
    assert cfg.data.train_json == "a.json"
    # smoke shrinks sizes and iterations only; the data choice survives
    assert cfg.trainer.max_iters < 50
    assert max(cfg.data.transforms.train.min_sizes) <= 128
    OmegaConf.to_container(cfg, resolve=True)


def test_smoke_shrinks_only_sizes_and_iterations():
    full = compose_config([])
    smoke = compose_config(["experiment=smoke"])
    assert full.data.name == smoke.data.name and full.model.name == smoke.model.name
    assert full.stage.name == smoke.stage.name
    assert smoke.model.d_model < full.model.d_model


@pytest.mark.parametrize(
    ("model", "optimizer", "clip", "max_proposals"),
    [
        ("deformable_detr", "adamw", 0.1, 50),
        ("co_deformable_detr", "adamw", 0.1, 50),
        ("fcos", "sgd", None, None),
        ("retinanet", "sgd", None, 50),
        ("faster_rcnn", "sgd", None, None),
    ],
)
def test_box_pretrain_takes_its_optimiser_clipping_and_proposal_cap_from_the_model(
    model, optimizer, clip, max_proposals
):
    cfg = compose_config([f"model={model}", "stage=box_pretrain"])
    assert cfg.trainer.optimizer.name == optimizer and cfg.trainer.clip_grad_norm == clip
    assert cfg.trainer.optimizer.lr == cfg.model.box_pretrain.optimizer.lr
    assert cfg.model.box_pretrain.max_proposals == max_proposals
    # The command line still wins, and fine-tuning keeps the trainer's own AdamW.
    overridden = compose_config([f"model={model}", "stage=box_pretrain", "trainer.optimizer.lr=0.5"])
    assert overridden.trainer.optimizer.lr == 0.5
    assert compose_config([f"model={model}", "stage=finetune"]).trainer.optimizer.name == "adamw"
