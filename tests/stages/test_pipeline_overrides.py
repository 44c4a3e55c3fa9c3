"""The pipeline's per-stage overrides (stage.overrides.<name>)."""

import re

import pytest
from omegaconf import OmegaConf

from stages import pipeline
from stages.errors import UserError
from tests.helpers import ROOT, compose_config


def test_stage_overrides_reach_only_their_stage(tmp_path):
    image = pipeline.compose_stage("image_pretrain", [], str(tmp_path), None, ["stage.method=supervised"])
    box = pipeline.compose_stage("box_pretrain", [], str(tmp_path), str(tmp_path / "image_pretrain"), [])
    assert image.stage.method == "supervised"
    assert box.stage.init_from == str(tmp_path / "image_pretrain")
    assert "method" not in box.stage


def test_stage_overrides_win_over_the_job_overrides_but_the_job_stage_keys_are_dropped(tmp_path):
    cfg = pipeline.compose_stage(
        "finetune", ["trainer.max_iters=7", "stage.init_from=/elsewhere"], str(tmp_path), None, ["trainer.log_every=3"]
    )
    assert (cfg.trainer.max_iters, cfg.trainer.log_every, cfg.stage.init_from) == (7, 3, None)


def test_a_bad_stage_override_is_one_line_naming_the_stage(tmp_path):
    with pytest.raises(UserError, match=r"^stage.overrides.finetune: \['stage.no_such_key=1'\]: ") as caught:
        pipeline.compose_stage("finetune", [], str(tmp_path), None, ["stage.no_such_key=1"])
    assert "\n" not in str(caught.value)


def test_a_stage_that_fails_to_compose_without_overrides_is_named_as_the_stage(tmp_path):
    # finetune composes its eval stage with no per-stage overrides: the error must not blame them.
    with pytest.raises(UserError, match=r"^stage eval: ") as caught:
        pipeline.compose_stage("eval", ["trainer.no_such_key=1"], str(tmp_path), None)
    assert "\n" not in str(caught.value)


def test_overrides_for_an_unknown_stage_name_are_refused(tmp_path):
    cfg = OmegaConf.create(
        {
            "seed": 0,
            "paths": {"run_dir": str(tmp_path)},
            "stage": {"stages": ["finetune", "eval"], "init_from": None, "overrides": {"box_pretrian": ["x=1"]}},
        }
    )
    with pytest.raises(UserError, match=r"stage.overrides: unknown stage\(s\) \['box_pretrian'\]"):
        pipeline.run(cfg)
    assert not (tmp_path / "pipeline.json").exists()


def test_the_readme_per_stage_override_example_parses():
    # The README's command must survive Hydra's override grammar (an unquoted `=` inside a list does not).
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"`python run\.py '(stage\.overrides\.image_pretrain=\[[^']*\])'`", readme)
    assert found, "README: the stage.overrides.image_pretrain example is missing"
    cfg = compose_config([found.group(1)])
    assert list(cfg.stage.overrides.image_pretrain) == ["stage.method=import", "stage.weights=r18.pth"]


def test_every_training_and_eval_stage_takes_overrides_without_a_plus():
    cfg = compose_config(['stage.overrides.finetune=["data.fraction=0.1"]'])
    assert list(cfg.stage.overrides.finetune) == ["data.fraction=0.1"]
    assert set(cfg.stage.overrides) == {"image_pretrain", "box_pretrain", "finetune", "eval"}
