"""CoDeformableDETR: positive-query groups, K=0 equals the plain DETR, gradients, eval isolation, checkpoints,
configs and bad input. Models are experiment=smoke's (d_model 32, 1 + 2 layers) built by stages.build."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict
from torchvision.ops import clip_boxes_to_image

from models.heads.base import AuxPositives
from models.layers.box_coding import normalize_boxes
from models.meta_arch.co_detr import CoDeformableDETR, QueryGroup
from models.meta_arch.deformable_detr import DeformableDETR
from stages.build import build_model, validate_model_config
from stages.engine.checkpoint import load_state_into
from stages.engine.trainer import total_loss
from stages.errors import UserError
from tests.helpers import CONF_DIR, compose_config
from tests.helpers.tiny_detr import two_tiny_images

pytestmark = pytest.mark.usefixtures("one_thread")
NUM_CLASSES = 3
AUX_PREFIXES = ("adapter", "aux_heads", "aux_query_embed", "aux_query_norm", "aux_feature_proj", "aux_feature_norm")


def model_config(overrides: tuple[str, ...] = ()):
    return compose_config(["experiment=smoke", "model=co_deformable_detr", *overrides]).model


def build(k: int, overrides: tuple[str, ...] = (), seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(model_config((f"model.num_aux_heads={k}", *overrides)), NUM_CLASSES)


def batch(size: int = 96) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Two images of different sizes (so padding and per-image normalisation matter) and their targets."""
    images, targets = two_tiny_images(size)
    images[0] = images[0][:, : size - 16, :]
    return images, targets


def is_auxiliary(name: str) -> bool:
    return name.startswith(AUX_PREFIXES)


# ---- customised positive queries ----


def spy_groups(model: CoDeformableDETR) -> list[tuple[AuxPositives, QueryGroup]]:
    """Record (the head's positives, the group built from them) for every head call."""
    calls = []
    build_group = model.build_query_group

    def spy(positives, image_sizes):
        group = build_group(positives, image_sizes)
        calls.append((positives, group))
        return group

    model.build_query_group = spy
    return calls


@pytest.mark.parametrize("k", [1, 2])
def test_positive_query_targets_equal_the_heads_assignments(k):
    model = build(k).train()
    calls = spy_groups(model)
    images, targets = batch()
    sizes = [(int(i.shape[1]), int(i.shape[2])) for i in images]
    model(images, targets)
    assert len(calls) == k
    for positives, group in calls:
        counts = positives.num_positives()
        assert max(counts) > 0
        size = min(max(max(counts), model.min_pos_queries), model.max_pos_queries)
        assert group.reference.shape[:2] == group.valid.shape == (2, size)
        for i, (h, w) in enumerate(sizes):
            kept = group.kept[i]
            assert kept.tolist() == list(range(counts[i]))  # fewer than max_pos_queries: all kept, in order
            p = len(kept)
            assert torch.equal(group.targets[i]["labels"], positives.labels[i])
            expected_boxes = normalize_boxes(positives.target_boxes[i].float(), (h, w))
            torch.testing.assert_close(group.targets[i]["boxes"], expected_boxes)
            # the head's own targets are the ground truth it says it assigned
            gt = normalize_boxes(targets[i]["boxes"][positives.gt_indices[i]], (h, w))
            torch.testing.assert_close(group.targets[i]["boxes"], gt)
            # reference boxes are the anchors / proposals themselves, clipped and normalised like the targets
            anchors = normalize_boxes(clip_boxes_to_image(positives.boxes[i].float(), (h, w)), (h, w))
            torch.testing.assert_close(group.reference[i, :p], anchors)
            torch.testing.assert_close(group.features[i, :p], positives.features[i])
            # padding: the head's negatives, then masked fillers only if it ran out of them
            assert group.num_negatives[i] == min(size - p, len(positives.negative_boxes[i]))
            negatives = normalize_boxes(clip_boxes_to_image(positives.negative_boxes[i].float(), (h, w)), (h, w))
            padded = group.reference[i, p : p + group.num_negatives[i]]
            assert all(torch.isclose(row, negatives).all(1).any() for row in padded)
            assert int(group.valid[i].sum()) == p + group.num_negatives[i]


def fake_positives(counts: list[int], negatives: list[int], channels: int = 32) -> AuxPositives:
    """Distinct boxes (x1 = index) with labels = index % 3, so kept entries can be traced back."""

    def boxes(n: int, offset: float) -> torch.Tensor:
        x = torch.arange(n, dtype=torch.float32) + offset
        return torch.stack([x, x, x + 10, x + 12], 1)

    return AuxPositives(
        boxes=[boxes(n, 1.0) for n in counts],
        labels=[torch.arange(n) % NUM_CLASSES for n in counts],
        target_boxes=[boxes(n, 2.0) for n in counts],
        gt_indices=[torch.arange(n) for n in counts],
        features=[torch.randn(n, channels) for n in counts],
        negative_boxes=[boxes(n, 30.0) for n in negatives],
        negative_features=[torch.randn(n, channels) for n in negatives],
    )


def test_groups_are_capped_at_max_and_padded_with_negatives_then_masked_fillers():
    model = build(1, ("model.detector.max_pos_queries=8", "model.detector.min_pos_queries=4"))
    sizes = [(64, 64), (64, 64)]
    positives = fake_positives(counts=[20, 2], negatives=[10, 3])
    group = model.build_query_group(positives, sizes)
    assert group.valid.shape == (2, 8)
    kept = group.kept[0]
    assert len(kept) == 8 and len(set(kept.tolist())) == 8 and int(kept.max()) < 20
    assert torch.equal(group.targets[0]["labels"], positives.labels[0][kept])
    assert group.num_negatives == [0, 3]
    assert group.valid[0].all()
    assert group.valid[1].tolist() == [True] * 5 + [False] * 3
    # fillers are hidden from every other query (each still sees itself)
    mask = model.filler_attention_mask(group)
    heads = model.transformer.decoder_layers[0].self_attn.num_heads
    assert mask.shape == (2 * heads, 8, 8)
    image1 = mask[heads]
    assert not image1[:, :5].any() and image1[0, 5:].all() and not image1[5, 5] and image1[5, 6]
    # and take no loss: only valid slots enter the class loss
    logits = torch.zeros(2, 8, NUM_CLASSES)
    boxes = torch.full((2, 8, 4), 0.5)
    full = model.criterion.loss_for_assignment(logits, boxes, group.targets, group.indices(), 1.0)
    masked = model.criterion.loss_for_assignment(logits, boxes, group.targets, group.indices(), 1.0, group.valid)
    one_negative_less = group.valid.clone()
    one_negative_less[1, 4] = False
    less = model.criterion.loss_for_assignment(logits, boxes, group.targets, group.indices(), 1.0, one_negative_less)
    background_slot = masked["loss_cls"] - less["loss_cls"]
    torch.testing.assert_close(full["loss_cls"] - masked["loss_cls"], 3 * background_slot)
    assert background_slot > 0


def test_a_batch_with_few_positives_gets_the_minimum_group_size():
    model = build(1, ("model.detector.min_pos_queries=4",))
    group = model.build_query_group(fake_positives(counts=[1, 0], negatives=[10, 10]), [(64, 64), (48, 80)])
    assert group.valid.shape == (2, 4) and group.valid.all()
    assert group.num_negatives == [3, 4]
    assert len(group.targets[1]["labels"]) == 0


# ---- K = 0 is the plain Deformable-DETR ----


def test_k0_is_exactly_the_plain_deformable_detr():
    torch.manual_seed(0)
    plain = build_model(compose_config(["experiment=smoke", "model=deformable_detr"]).model, NUM_CLASSES).train()
    co = build(0, seed=0).train()
    assert type(plain) is DeformableDETR and isinstance(co, CoDeformableDETR)
    plain_state, co_state = plain.state_dict(), co.state_dict()
    assert list(plain_state) == list(co_state)
    assert all(torch.equal(plain_state[k], co_state[k]) for k in plain_state)  # same seed, same weights
    images, targets = batch()
    torch.manual_seed(1)
    plain_losses = plain(images, targets)
    torch.manual_seed(1)
    co_losses = co(images, targets)
    assert list(plain_losses) == list(co_losses)
    assert all(torch.equal(plain_losses[k], co_losses[k]) for k in plain_losses)


def test_the_detrs_initial_weights_do_not_depend_on_k():
    k0, k2 = build(0, seed=3), build(2, seed=3)
    k2_state = k2.state_dict()
    for name, value in k0.state_dict().items():
        assert torch.equal(value, k2_state[name]), name


def test_training_loss_keys_are_grouped_by_head_prefix():
    model = build(2).train()
    losses = model(*batch())
    prefixes = {key.split("/")[0] for key in losses}
    assert prefixes == {"detr", "aux0_atss", "aux0_atss_queries", "aux1_faster_rcnn", "aux1_faster_rcnn_queries"}
    layers = {k for k in losses if k.startswith("aux1_faster_rcnn_queries/")}
    assert layers == {f"aux1_faster_rcnn_queries/loss_{n}{s}" for n in ("cls", "bbox", "giou") for s in ("", "_d0")}
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in losses.values())


def test_lambdas_scale_the_query_and_head_losses():
    images, targets = batch()
    losses = {}
    for lambdas in (("1.0", "2.0"), ("0.5", "1.0")):
        model = build(1, (f"model.detector.lambda1={lambdas[0]}", f"model.detector.lambda2={lambdas[1]}")).train()
        torch.manual_seed(5)
        with torch.no_grad():
            losses[lambdas] = model(images, targets)
    default, half = losses[("1.0", "2.0")], losses[("0.5", "1.0")]
    # Halving lambda2 halves the head losses (times lambda2 x L), halving lambda1 the query losses.
    for key in ("aux0_atss_queries/loss_cls", "aux0_atss_queries/loss_giou_d0", "aux0_atss/loss_cls"):
        torch.testing.assert_close(half[key], 0.5 * default[key])
    torch.testing.assert_close(half["detr/loss_cls"], default["detr/loss_cls"])


@pytest.mark.parametrize("layers", [3, 6])
def test_head_losses_are_their_weighted_losses_times_lambda2_and_the_decoder_depth(layers):
    images, targets = batch()
    model = build(1, (f"model.num_decoder_layers={layers}",)).train()
    assert model.head_loss_scale == 2.0 * layers  # lambda2 = 2, Eq. 6's sum over the L decoder layers
    losses = {}
    for scale in (model.head_loss_scale, 1.0):
        model.head_loss_scale = scale
        torch.manual_seed(5)
        with torch.no_grad():
            losses[scale] = model(images, targets)
    for key in ("aux0_atss/loss_cls", "aux0_atss/loss_bbox", "aux0_atss/loss_centerness"):
        torch.testing.assert_close(losses[2.0 * layers][key], 2.0 * layers * losses[1.0][key])


# ---- gradients, eval isolation, checkpoints ----


def test_gradients_reach_every_auxiliary_parameter_with_four_heads():
    # Images large enough for a 2x2 stride-128 map: on a 1x1 map GroupNorm makes the extra level's conv
    # gradient exactly zero.
    model = build(4).train()
    sum(model(*batch(160)).values()).backward()
    aux = {n: p for n, p in model.named_parameters() if is_auxiliary(n) and p.requires_grad}
    assert any(n.startswith("aux_heads.3.") for n in aux)
    missing = [n for n, p in aux.items() if p.grad is None or not torch.isfinite(p.grad).all()]
    zero = [n for n, p in aux.items() if p.grad is not None and p.grad.abs().sum() == 0]
    assert not missing and not zero, (missing, zero)


def test_eval_forward_never_calls_an_auxiliary_module():
    model = build(2)
    called = []

    def fail(module, args, output):
        called.append(type(module).__name__)

    handles = [
        module.register_forward_hook(fail)
        for name, module in model.named_modules()
        if is_auxiliary(name) and not isinstance(module, torch.nn.ModuleList)
    ]
    assert len(handles) > 10
    images, _ = batch()
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert len(outputs) == 2 and not called
    model.train()
    model(*batch())  # the hooks do fire in training: the check above can fail
    assert {"MultiScaleAdapter", "ATSSAuxHead", "FasterRCNNAuxHead", "Linear", "LayerNorm"} <= set(called)
    for handle in handles:
        handle.remove()


def test_a_k2_checkpoint_in_the_k0_model_gives_identical_boxes():
    k2 = build(2).train()
    optimizer = torch.optim.SGD(k2.parameters(), lr=1e-3)
    total_loss(k2(*batch())).backward()
    optimizer.step()  # move the weights off their initial values
    k0 = build(0, seed=7)
    report = load_state_into(k0, copy.deepcopy(k2.state_dict()), "k2")
    assert set(report.skipped_name) == {m for m in AUX_PREFIXES}
    assert not report.skipped_shape and not report.fresh
    images, _ = batch()
    with torch.no_grad():
        expected, got = k2.eval()(images), k0.eval()(images)
    for e, g in zip(expected, got):
        assert torch.equal(e["boxes"], g["boxes"]) and torch.equal(e["scores"], g["scores"])
        assert torch.equal(e["labels"], g["labels"])


# ---- AMP safety ----


def test_under_bf16_autocast_the_auxiliary_path_stays_float32_and_finite():
    model = build(2).train()
    calls = spy_groups(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(*batch())
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    assert all(group.reference.dtype == torch.float32 for _, group in calls)
    assert all(group.targets[0]["boxes"].dtype == torch.float32 for _, group in calls)


def test_a_non_finite_auxiliary_loss_stops_training_naming_its_term():
    model = build(2).train()
    with torch.no_grad():
        model.aux_heads[0].tower.cls_pred.bias.fill_(float("nan"))
    losses = model(*batch())
    with pytest.raises(FloatingPointError, match="aux0_atss/loss_cls"):
        total_loss(losses)


# ---- configs and bad input ----


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.num_aux_heads=5", "model.num_aux_heads"),
        ("model.num_aux_heads=-1", "model.num_aux_heads"),
        ("model.aux_heads.0=yolo", "unknown head 'yolo'"),
        ("model.detector.lambda1=-1", "model.detector.lambda1"),
        ("model.detector.lambda2=-0.5", "model.detector.lambda2"),
    ],
)
def test_bad_co_detr_settings_give_one_user_error_before_any_data(override, fragment):
    with pytest.raises(UserError, match=fragment.replace("(", r"\(")):
        validate_model_config(model_config((override,)))


def test_disagreeing_aux_strides_give_a_user_error():
    cfg = model_config(("model.num_aux_heads=1",))
    with open_dict(cfg):
        cfg.aux_strides = [8, 16, 32, 64]
    with pytest.raises(UserError, match="model.aux_strides"):
        build_model(cfg, NUM_CLASSES)


def published_heads() -> dict:
    return OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "model" / "aux_heads.yaml"))


def test_cpu_heads_are_aux_heads_yaml_except_the_documented_faster_rcnn_sizes():
    published = published_heads()
    model = compose_config(["model=co_deformable_detr"]).model
    cpu = OmegaConf.to_container(model.aux_head_configs)
    sizes = {"rpn_pre_nms_top_n", "rpn_post_nms_top_n", "roi_sampling_ratio", "representation_size"}
    sizes.add("rcnn_batch_size_per_image")
    assert list(model.aux_heads) == published["aux_heads"] == ["atss", "faster_rcnn", "retinanet", "fcos"]
    assert cpu.keys() == published["aux_head_configs"].keys()
    for name, ours in cpu.items():
        theirs = published["aux_head_configs"][name]
        assert set(ours) == set(theirs), name
        assert {k for k in ours if ours[k] != theirs[k]} == (sizes if name == "faster_rcnn" else set()), name


def test_coco_experiment_is_the_published_recipe():
    cfg = compose_config(["experiment=coco_r50_co_deformable_detr_12e", "data.root=/coco"])
    published = published_heads()
    assert list(cfg.model.aux_heads) == published["aux_heads"]
    assert OmegaConf.to_container(cfg.model.aux_head_configs) == published["aux_head_configs"]
    m, t = cfg.model, cfg.trainer
    assert (m.name, m.num_aux_heads, m.d_model, m.num_queries) == ("co_deformable_detr", 2, 256, 300)
    det = m.detector
    assert det.two_stage and det.mixed_query_selection and det.look_forward_twice and det.with_box_refine
    assert (det.backbone.depth, det.backbone.norm, det.backbone.frozen_stages) == (50, "frozen_bn", 1)
    tr = det.transformer
    assert (tr.num_encoder_layers, tr.num_decoder_layers, tr.dim_feedforward) == (6, 6, 2048)
    assert (det.lambda1, det.lambda2, det.max_pos_queries) == (1.0, 2.0, 300)
    assert (t.optimizer.lr, t.optimizer.weight_decay, t.clip_grad_norm, t.epochs) == (2e-4, 1e-4, 0.1, 12)
    assert dict(t.optimizer.lr_mults) == {"backbone": 0.1, "sampling_offsets": 0.1, "reference_points": 0.1}
    assert round(t.scheduler.milestones[0] * t.epochs) == 11 and len(t.scheduler.milestones) == 1
    assert (t.device, t.amp_dtype, cfg.data.name) == ("cuda", "bf16", "coco")
    assert min(cfg.data.transforms.train.min_sizes) == 480 and max(cfg.data.transforms.train.min_sizes) == 800
    assert cfg.data.transforms.train.max_size == 1333
