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
