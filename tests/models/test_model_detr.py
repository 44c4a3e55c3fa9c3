"""DeformableDETR: training losses and gradients, eval outputs, the Deformable-DETR++ flags, the config."""

import pytest
import torch
from hydra import compose, initialize_config_dir

from stages.build import build_model
from stages.errors import UserError
from tests.helpers.tiny_detr import CONF_DIR, tiny_detr, two_tiny_images

pytestmark = pytest.mark.usefixtures("one_thread")

FLAG_SETS = {
    "plain_no_refine": ["model.detector.with_box_refine=false"],
    "two_stage": ["model.detector.two_stage=true"],
    "two_stage_no_refine": ["model.detector.two_stage=true", "model.detector.with_box_refine=false"],
    "mixed_query_selection": ["model.detector.two_stage=true", "model.detector.mixed_query_selection=true"],
    "look_forward_twice": ["model.detector.look_forward_twice=true"],
    "all_pp": [
        "model.detector.two_stage=true",
        "model.detector.mixed_query_selection=true",
        "model.detector.look_forward_twice=true",
    ],
}


def _different_sizes():
    images, targets = two_tiny_images()
    return [images[0][:, :48, :], images[1]], [
        {"boxes": torch.tensor([[8.0, 10.0, 40.0, 45.0]]), "labels": torch.tensor([0])},
        targets[1],
    ]


def test_training_returns_finite_detr_losses_per_layer():
    model = tiny_detr().train()
    losses = model(*_different_sizes())
    names = ["detr/loss_cls", "detr/loss_bbox", "detr/loss_giou"]
    assert set(losses) == {f"{n}{s}" for n in names for s in ("", "_d0")}  # smoke: 2 decoder layers
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())


def test_gradients_reach_backbone_neck_transformer_and_heads():
    model = tiny_detr().train()
    sum(model(*_different_sizes()).values()).backward()
    for prefix in (
        "backbone.body.layer1",
        "neck.",
        "transformer.encoder_layers",
        "transformer.decoder_layers",
        "class_embed",
        "bbox_embed",
        "query_embed",
        "reference_points",
    ):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(prefix)]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), prefix


def test_eval_returns_max_detections_inside_each_image():
    model = tiny_detr(overrides=("model.detector.max_detections=7",)).eval()
    images, _ = _different_sizes()
    with torch.no_grad():
        outputs = model(images)
    for image, out in zip(images, outputs):
        h, w = image.shape[1:]
        assert out["boxes"].shape == (7, 4) and out["scores"].shape == (7,) and out["labels"].shape == (7,)
        assert (out["boxes"][:, 0::2] >= 0).all() and (out["boxes"][:, 0::2] <= w).all()
        assert (out["boxes"][:, 1::2] >= 0).all() and (out["boxes"][:, 1::2] <= h).all()
        assert (out["boxes"][:, 2:] >= out["boxes"][:, :2]).all()
        assert (out["scores"][:-1] >= out["scores"][1:]).all() and out["labels"].max() < 3


def test_eval_is_independent_of_the_other_images_in_the_batch():
    model = tiny_detr(overrides=("model.detector.max_detections=5",)).eval()
    images, _ = _different_sizes()
    with torch.no_grad():
        batched = model(images)
        alone = model([images[0]])
    assert torch.allclose(batched[0]["boxes"], alone[0]["boxes"], atol=1e-3)
    assert torch.allclose(batched[0]["scores"], alone[0]["scores"], atol=1e-4)


@pytest.mark.parametrize("flags", FLAG_SETS.values(), ids=FLAG_SETS.keys())
def test_each_deformable_detr_pp_option_trains_and_evaluates(flags):
    model = tiny_detr(overrides=tuple(flags)).train()
    images, targets = _different_sizes()
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    two_stage = "model.detector.two_stage=true" in flags
    assert ("detr/loss_giou_enc" in losses) == two_stage
    if two_stage:
        assert model.enc_class_embed.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert len(outputs) == 2 and all(torch.isfinite(o["boxes"]).all() for o in outputs)


@pytest.mark.parametrize(
    "flags",
    [
        ["model.detector.mixed_query_selection=true"],
        ["model.detector.look_forward_twice=true", "model.detector.with_box_refine=false"],
    ],
)
def test_options_without_their_prerequisite_raise_a_user_error(flags):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=["experiment=smoke", *flags])
    with pytest.raises(UserError, match=f"^model.detector.{flags[0].split('.')[-1].split('=')[0]}: "):
        build_model(cfg.model, 3)


def test_training_under_cpu_autocast_gives_finite_losses():
    model = tiny_detr(overrides=("model.detector.two_stage=true",)).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(*_different_sizes())
    sum(losses.values()).backward()
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


def test_cpu_preset_builds_the_documented_sizes():
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config")
    model = instantiate(cfg.model.detector, num_classes=5)
    assert model.transformer.d_model == 128 and model.num_queries == 100
    assert len(model.transformer.encoder_layers) == 3 and len(model.transformer.decoder_layers) == 3
    assert model.strides == [8, 16, 32, 64] and model.query_embed.weight.shape == (100, 256)
    assert model.class_embed[0].out_features == 5 and model.class_embed[0] is not model.class_embed[1]
