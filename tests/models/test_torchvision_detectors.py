"""torchvision FCOS / RetinaNet / Faster R-CNN wrappers: training, inference, labels, AlignDet outputs, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from models.matching.assigners import BACKGROUND
from models.matching.priors import StrideAnchorGenerator, TorchvisionAnchors
from models.pretrain.align_outputs import BACKGROUND_ID, AlignableDetector, AlignOptions, AlignOutputs
from stages.build import build_model
from stages.engine.checkpoint import drop_matches
from stages.errors import UserError
from stages.report import find_job_dirs
from tests.helpers import compose_config, run_cli

KINDS = ["fcos", "retinanet", "faster_rcnn"]
NUM_CLASSES = 3
# Score thresholds that keep every detection, so untrained models still output boxes.
KEEP_ALL = {
    "fcos": ["model.detector.score_thresh=0.0"],
    "retinanet": ["model.detector.score_thresh=0.0"],
    "faster_rcnn": ["model.detector.box_score_thresh=0.0"],
}


pytestmark = pytest.mark.usefixtures("one_thread")


def build(kind: str, overrides: list[str] = (), num_classes: int = NUM_CLASSES):
    """The detector of conf/model/<kind>.yaml at a 32-channel width."""
    cfg = compose_config([f"model={kind}", "model.d_model=32", *overrides])
    torch.manual_seed(0)
    return instantiate(cfg.model.detector, num_classes=num_classes)


def two_images() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 96, generator=g), torch.rand(3, 80, 64, generator=g)]
    targets = [
        {"boxes": torch.tensor([[8.0, 6.0, 50.0, 40.0], [40.0, 20.0, 90.0, 60.0]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.tensor([[4.0, 10.0, 40.0, 70.0]]), "labels": torch.tensor([1])},
    ]
    return images, targets


def proposal_targets(targets, id_offsets=(0, 100)) -> list[dict[str, torch.Tensor]]:
    """Box-pretraining targets: the same boxes, label 0 (one pseudo-class), ids offset per image."""
    return [
        {"boxes": t["boxes"], "labels": torch.zeros_like(t["labels"]), "ids": torch.arange(len(t["boxes"])) + off}
        for t, off in zip(targets, id_offsets)
    ]


def grad_norm(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


@pytest.mark.parametrize("kind", KINDS)
def test_training_returns_finite_prefixed_losses_whose_gradients_reach_backbone_neck_and_heads(kind):
    model = build(kind).train()
    images, targets = two_images()
    losses = model(images, targets)
    assert losses and all(k.startswith(f"{kind}/loss_") for k in losses), sorted(losses)
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    sum(losses.values()).backward()
    heads = ["head"] if kind != "faster_rcnn" else ["rpn", "roi_heads"]
    for name in ["backbone", "neck", *heads]:
        assert grad_norm(getattr(model, name)) > 0, name


@pytest.mark.parametrize("kind", KINDS)
def test_eval_boxes_lie_inside_each_input_image_with_scores_and_labels_in_range(kind):
    model = build(kind, KEEP_ALL[kind]).eval()
    images, _ = two_images()
    with torch.no_grad():
        outputs = model(images)
    assert len(outputs) == 2
    for image, out in zip(images, outputs):
        h, w = image.shape[-2:]
        boxes, scores, labels = out["boxes"], out["scores"], out["labels"]
        assert boxes.shape[0] > 0 and boxes.shape == (scores.shape[0], 4) == (labels.shape[0], 4)
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert ((scores >= 0) & (scores <= 1)).all()
        assert labels.dtype == torch.int64 and labels.min() >= 0 and labels.max() < NUM_CLASSES


def test_faster_rcnn_shifts_labels_past_background_inside_and_back_outside():
    model = build("faster_rcnn")
    images, targets = two_images()
    _, tv_targets = model._prepare(images, targets)
    assert [t["labels"].tolist() for t in tv_targets] == [[1, 3], [2]]
    # A classifier that always says torchvision class C (= our last class C-1) must come back as C-1.
    cls_score = model.roi_heads.box_predictor.cls_score
    with torch.no_grad():
        cls_score.weight.zero_()
        cls_score.bias.fill_(-10.0)
        cls_score.bias[NUM_CLASSES] = 10.0
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert all(o["labels"].numel() and (o["labels"] == NUM_CLASSES - 1).all() for o in outputs)


@pytest.mark.parametrize("kind", ["fcos", "retinanet"])
def test_dense_detectors_keep_labels_unshifted(kind):
    model = build(kind)
    images, targets = two_images()
    _, tv_targets = model._prepare(images, targets)
    assert [t["labels"].tolist() for t in tv_targets] == [[0, 2], [1]]


# A frozen backbone and fewer sampled anchors and RoIs than the preset, to keep the overfitting loop quick.
QUICK = ["model.detector.backbone.frozen_stages=4"]
SMALL_SAMPLING = {
    "fcos": QUICK,
    "retinanet": QUICK,
    "faster_rcnn": [
        *QUICK,
        "model.detector.rpn_batch_size_per_image=64",
        "model.detector.rpn_post_nms_top_n_train=100",
        "model.detector.box_batch_size_per_image=64",
    ],
}


@pytest.mark.parametrize("kind", KINDS)
def test_one_image_overfits_in_thirty_steps(kind):
    model = build(kind, SMALL_SAMPLING[kind]).train()
    images, targets = two_images()
    images, targets = images[:1], targets[:1]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    history = []
    for _ in range(30):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert sum(history[-5:]) / 5 < 0.6 * sum(history[:5]) / 5, history


def test_fcos_matching_gives_torchvisions_losses():
    model = build("fcos").train()
    images, targets = two_images()
    image_list, tv_targets = model._prepare(images, targets)
    features = list(model.pyramid(image_list.tensors).values())
    head_outputs = model.head(features)
    anchors = model.anchor_generator(image_list, features)
    per_level = [f.shape[-2] * f.shape[-1] for f in features]
    ours = model.compute_loss(tv_targets, head_outputs, anchors, per_level)
    theirs = FCOS.compute_loss(model, tv_targets, head_outputs, anchors, per_level)
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key])
    assert sum(int((m >= 0).sum()) for m in model.match(anchors, tv_targets, per_level)) > 0


def test_fcos_exp_regression_starts_near_one_stride_and_keeps_the_state_dict_keys():
    relu = build("fcos", ["model.detector.regression_activation=relu"])
    exp = build("fcos", ["model.detector.regression_activation=exp"])
    assert relu.state_dict().keys() == exp.state_dict().keys()
    images, _ = two_images()
    image_list, _ = exp._prepare(images, None)
    features = list(exp.pyramid(image_list.tensors).values())
    with torch.no_grad():
        relu_distances, _ = relu.head.regression_head(features)
        exp_distances, _ = exp.head.regression_head(features)
    # Same N(0, 0.01) weights: relu gives distances near 0 (half exactly 0), exp near 1 stride and never 0.
    assert (relu_distances == 0).float().mean() > 0.2 and relu_distances.max() < 0.5
    assert (exp_distances > 0.5).all() and (exp_distances < 2.0).all()
    assert user_error_of("fcos", ["model.detector.regression_activation=sigmoid"]).startswith(
        "model.detector.regression_activation: "
    )


def test_retinanet_matching_gives_torchvisions_losses():
    model = build("retinanet").train()
    images, targets = two_images()
    image_list, tv_targets = model._prepare(images, targets)
    features = list(model.pyramid(image_list.tensors).values())
    head_outputs = model.head(features)
    anchors = model.anchor_generator(image_list, features)
    ours = model.compute_loss(tv_targets, head_outputs, anchors)
    theirs = RetinaNet.compute_loss(model, tv_targets, head_outputs, anchors)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key])


def test_stride_anchors_equal_torchvisions_when_the_batch_divides_every_stride():
    sizes, ratios, strides = [[16.0, 20.0], [32.0, 40.0]], [0.5, 2.0], [8, 16]
    anchors = TorchvisionAnchors(StrideAnchorGenerator.from_sizes(strides, sizes, ratios))
    image_list = ImageList(torch.zeros(1, 3, 64, 96), [(60, 90)])
    maps = [torch.zeros(1, 4, 8, 12), torch.zeros(1, 4, 4, 6)]
    theirs = AnchorGenerator(tuple(map(tuple, sizes)), (tuple(ratios),) * 2)(image_list, maps)[0]
    assert torch.equal(anchors(image_list, maps)[0], theirs)
    # A 40-px-high batch gives a 3-row stride-16 map, which torchvision would read as stride 40 // 3 = 13.
    odd = anchors(ImageList(torch.zeros(1, 3, 40, 48), [(40, 48)]), [torch.zeros(1, 4, 5, 6), torch.zeros(1, 4, 3, 3)])[
        0
    ]
    level2 = odd[5 * 6 * 4 :]
    centers_y = ((level2[:, 1] + level2[:, 3]) / 2).unique()
    assert centers_y.tolist() == [0.0, 16.0, 32.0]


@pytest.mark.parametrize("kind", KINDS)
def test_align_outputs_give_assigned_proposal_ids_with_one_feature_row_each_and_box_losses(kind):
    model = build(kind).train()
    assert isinstance(model, AlignableDetector)
    images, targets = two_images()
    view = proposal_targets(targets)
    out = model.align_outputs(images, view, with_losses=True)
    assert isinstance(out, AlignOutputs)
    dims = model.align_feature_dims()
    assert set(out.features) == set(dims)
    all_ids = set(torch.cat([t["ids"] for t in view]).tolist())
    for branch, feats in out.features.items():
        ids = out.ids[branch]
        assert feats.shape == (ids.shape[0], dims[branch]) and ids.shape[0] > 0
        assert ids.dtype == torch.int64 and set(ids.tolist()) <= all_ids
    assert out.losses and all(k.startswith(f"{kind}/loss_") and torch.isfinite(v) for k, v in out.losses.items())
    assert not any("classif" in k for k in out.losses)
    (sum(out.losses.values()) + sum(f.sum() for f in out.features.values())).backward()
    assert grad_norm(model.neck) > 0
    assert model.align_outputs(images, view, with_losses=False).losses == {}


@pytest.mark.parametrize("kind", KINDS)
def test_align_outputs_of_a_batch_are_each_images_outputs_in_image_order(kind):
    # Same-size images (no padding) in eval mode (BatchNorm statistics fixed): a batch must give exactly the
    # rows of each image alone, image 1's first, each with its own image's ids (0.. vs 100..).
    model = build(kind).eval()
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 64, 96, generator=g), torch.rand(3, 64, 96, generator=g)]
    _, targets = two_images()
    view = proposal_targets(targets)
    with torch.no_grad():
        batch = model.align_outputs(images, view, with_losses=False)
        alone = [model.align_outputs([img], [t], with_losses=False) for img, t in zip(images, view)]
    for branch in batch.features:
        ids = batch.ids[branch]
        first = ids < 100
        assert first.any() and (~first).any()
        assert first[: int(first.sum())].all(), "image 1's rows must come first"
        for part, single in ((first, alone[0]), (~first, alone[1])):
            assert torch.equal(ids[part], single.ids[branch])
            torch.testing.assert_close(batch.features[branch][part], single.features[branch], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["fcos", "retinanet"])
def test_dense_align_background_rows_are_unassigned_locations_up_to_the_cap(kind):
    model = build(kind).train()
    images, targets = two_images()
    proposals = proposal_targets(targets)
    with torch.no_grad():
        plain = model.align_outputs(images, proposals, False)
        full = model.align_outputs(images, proposals, False, AlignOptions(max_background=10**6))
        capped = model.align_outputs(images, proposals, False, AlignOptions(max_background=5))
        batch = model.align_batch(images, proposals)
    matched = torch.stack(batch.matched)
    if kind == "fcos":
        expected = int((matched == BACKGROUND).sum())
    else:  # locations with a background anchor and no positive one
        per_location = matched.view(matched.shape[0], -1, model.num_anchors)
        expected = int(((per_location == BACKGROUND).any(2) & ~(per_location >= 0).any(2)).sum())
    ids = full.ids[kind]
    num_assigned = len(plain.ids[kind])
    assert torch.equal(ids[:num_assigned], plain.ids[kind]) and (plain.ids[kind] >= 0).all()
    assert 0 < expected == int((ids == BACKGROUND_ID).sum()) == len(ids) - num_assigned
    assert int((capped.ids[kind] == BACKGROUND_ID).sum()) == 5


def test_faster_rcnn_align_rows_stay_positive_rois_as_the_reference():
    model = build("faster_rcnn").train()
    images, targets = two_images()
    torch.manual_seed(0)
    out = model.align_outputs(images, proposal_targets(targets), False, AlignOptions(max_background=2048))
    assert (out.ids["rcnn"] >= 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_align_drop_keys_name_only_final_classifier_and_regressor_layers(kind):
    model = build(kind)
    keys = list(model.state_dict())
    for drop in model.align_drop_keys():
        hits = [k for k in keys if drop_matches(k, drop)]
        assert hits, drop
        assert not any(k.startswith(("backbone.", "neck.", "rpn.")) for k in hits), hits
    dropped = [k for k in keys if any(drop_matches(k, d) for d in model.align_drop_keys())]
    assert any("cls_logits" in k or "cls_score" in k for k in dropped)


def user_error_of(kind: str, overrides: list[str]) -> str:
    """The one-line UserError building `kind` from its config with `overrides` raises."""
    cfg = compose_config([f"model={kind}", "model.d_model=32", *overrides])
    with pytest.raises(UserError) as info:
        build_model(cfg.model, NUM_CLASSES)
    return str(info.value)


def test_bad_loss_weights_widths_and_levels_are_user_errors():
    assert user_error_of("fcos", ["~model.detector.loss_weights.bbox_ctrness"]).startswith(
        "model.detector.loss_weights: "
    )
    assert user_error_of("fcos", ["model.detector.head_norm_groups=32"]).startswith("model.detector.head_norm_groups: ")
    assert user_error_of("retinanet", ["model.detector.anchor_sizes=[16,32]"]).startswith(
        "model.detector.anchor_sizes: "
    )


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_keeps_backbone_body_names_for_image_pretrain_checkpoints(kind):
    keys = list(build(kind).state_dict())
    assert {"backbone", "neck"} <= {k.split(".")[0] for k in keys}
    assert any(k.startswith("backbone.body.layer1.") for k in keys)


def test_cli_smoke_finetune_runs_for_each_torchvision_detector(tmp_path, data_dir):
    # One sweep process for the three detectors: `python run.py -m experiment=smoke model=... stage=finetune`.
    args = ["-m", "experiment=smoke", f"model={','.join(KINDS)}", "stage=finetune", f"hydra.sweep.dir={tmp_path}"]
    proc = run_cli(args, tmp_path / "unused", data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = find_job_dirs(tmp_path)
    assert len(jobs) == len(KINDS)
    for job, kind in zip(jobs, KINDS):
        summary = json.loads((job / "finetune" / "summary.json").read_text())
        assert summary["iterations"] > 0
        assert summary["metrics"] and all(k.startswith(f"{kind}/") or k == "loss" for k in summary["metrics"])
