"""AlignDet wrapper: the box-domain contrastive loss, the EMA schedule and update, id bookkeeping across a batch,
the frozen backbone, and the DETR / Co-DETR align branches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.pretrain.align_outputs import BACKGROUND_ID, AlignOptions, AlignOutputs, with_background
from models.pretrain.aligndet import AlignDet, box_contrastive_loss, momentum_at
from stages.engine.checkpoint import drop_matches
from tests.helpers import compose_config
from tests.helpers.tiny_detr import tiny_detr, two_tiny_images

pytestmark = pytest.mark.usefixtures("one_thread")


def proposal_targets(boxes: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    return [{"boxes": b, "labels": torch.zeros(len(b), dtype=torch.int64), "ids": torch.arange(len(b))} for b in boxes]


def wrap(detector: torch.nn.Module, freeze_backbone: bool = True, max_background: int = 0, **options: bool) -> AlignDet:
    """AlignDet around `detector` with small test settings; `options` are its detr_* switches."""
    return AlignDet(
        detector,
        projector_hidden_dim=None,
        projector_out_dim=16,
        temperature=0.5,
        base_momentum=0.996,
        contrastive_weight=1.0,
        freeze_backbone=freeze_backbone,
        max_background=max_background,
        **options,
    )


# ---- the contrastive loss ----


def test_box_contrastive_loss_equals_hand_computed_three_proposal_example():
    # Three proposals; the momentum view lost proposal 2, so its positive is its own online embedding (K = Q).
    q = torch.tensor([[3.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # q0 is not unit length: the loss normalises
    k = torch.tensor([[0.8, 0.6], [0.6, 0.8]])
    q_ids, k_ids = torch.tensor([0, 1, 2]), torch.tensor([0, 1])
    # Dot products / temperature 0.5 of the unit vectors:
    # id 0: positive q0.k0 = 0.8 -> 1.6; negatives q0.q1 = 0 -> 0, q0.q2 = -1 -> -2, q0.k1 = 0.6 -> 1.2
    loss0 = -math.log(math.exp(1.6) / (math.exp(1.6) + math.exp(0.0) + math.exp(-2.0) + math.exp(1.2)))
    # id 1: positive q1.k1 = 0.8 -> 1.6; negatives q1.q0 = 0, q1.q2 = 0, q1.k0 = 0.6 -> 1.2
    loss1 = -math.log(math.exp(1.6) / (math.exp(1.6) + math.exp(0.0) + math.exp(0.0) + math.exp(1.2)))
    # id 2: positive q2.q2 = 1 -> 2; negatives q2.q0 = -1 -> -2, q2.q1 = 0, q2.k0 = -0.8 -> -1.6, q2.k1 = -0.6 -> -1.2
    loss2 = -math.log(
        math.exp(2.0) / (math.exp(2.0) + math.exp(-2.0) + math.exp(0.0) + math.exp(-1.6) + math.exp(-1.2))
    )
    # By hand: loss0 = -log(4.953 / 9.409) = 0.6416, loss1 = -log(4.953 / 10.273) = 0.7296,
    # loss2 = -log(7.389 / 9.028) = 0.2002; their mean over the three ids is 0.5238.
    expected = (loss0 + loss1 + loss2) / 3
    assert expected == pytest.approx(0.5238, abs=1e-4)
    got = box_contrastive_loss(q, q_ids, k, k_ids, temperature=0.5)
    assert float(got) == pytest.approx(expected, rel=1e-6)


def reference_loop_loss(q, q_ids, k, k_ids, temperature):
    """The reference's per-id loop (numpy, float64): mean over |Q||K| pairs, then over ids."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    k = k / np.linalg.norm(k, axis=1, keepdims=True)
    losses = []
    for label in np.unique(q_ids):
        query = q[q_ids == label]
        key = k[k_ids == label] if (k_ids == label).any() else query
        neg = np.concatenate([q[q_ids != label], k[k_ids != label]])
        pairs = []
        for a in query:
            for b in key:
                pos = math.exp(a @ b / temperature)
                pairs.append(-math.log(pos / (pos + np.exp(neg @ a / temperature).sum())))
        losses.append(np.mean(pairs))
    return float(np.mean(losses))


def test_box_contrastive_loss_matches_the_per_id_loop_with_repeated_and_missing_ids():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(9, 5, generator=g, dtype=torch.float64)
    k = torch.randn(7, 5, generator=g, dtype=torch.float64)
    # Ids repeat (several layers / anchors per proposal); id 4 has no momentum sample, id 9 no online one.
    q_ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4])
    k_ids = torch.tensor([0, 1, 1, 2, 3, 3, 9])
    expected = reference_loop_loss(q.numpy(), q_ids.numpy(), k.numpy(), k_ids.numpy(), 0.2)
    assert float(box_contrastive_loss(q, q_ids, k, k_ids, 0.2)) == pytest.approx(expected, rel=1e-5)


def test_box_contrastive_loss_sends_no_gradient_through_negatives():
    q = torch.tensor([[1.0, 0.2], [0.1, 1.0]], requires_grad=True)
    k = torch.tensor([[0.9, 0.1], [0.0, 1.0]])
    ids = torch.tensor([0, 1])
    (grad,) = torch.autograd.grad(box_contrastive_loss(q, ids, k, ids, 0.5), q)
    # q1 is a detached negative in id 0's term, so its gradient is that of id 1's term alone (times 1/2, the
    # mean over ids). Id 1's term on its own: query q1, key k1, negatives k0 and q0 (given as a fixed sample).
    q1 = q.detach()[1:].clone().requires_grad_(True)
    alone = box_contrastive_loss(q1, torch.tensor([1]), torch.cat([k, q.detach()[:1]]), torch.tensor([0, 1, 0]), 0.5)
    (grad1,) = torch.autograd.grad(alone, q1)
    assert grad[1].abs().sum() > 0
    assert torch.allclose(grad[1], 0.5 * grad1[0], atol=1e-6)


def test_a_background_sample_joins_every_proposals_denominator_and_nothing_else():
    # One proposal (id 0) seen in both views, another proposal (id 1) online only; then background rows in each view.
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[0.8, 0.6]])
    q_ids, k_ids = torch.tensor([0, 1]), torch.tensor([0])
    before = box_contrastive_loss(q, q_ids, k, k_ids, temperature=0.5)
    # id 0: positive q0.k0 = 0.8 -> 1.6, negative q0.q1 = 0 -> 0; id 1: positive q1.q1 = 1 -> 2, negatives
    # q1.q0 = 0 -> 0 and q1.k0 = 0.6 -> 1.2.
    loss0 = -math.log(math.exp(1.6) / (math.exp(1.6) + 1.0))
    loss1 = -math.log(math.exp(2.0) / (math.exp(2.0) + 1.0 + math.exp(1.2)))
    assert float(before) == pytest.approx((loss0 + loss1) / 2, rel=1e-6)
    # A background row b = (-0.6, 0.8) in the online view and b' = (0.6, -0.8) in the momentum view: each adds
    # exp(q.b / 0.5) to both ids' denominators; neither is a query, so the mean stays over ids 0 and 1.
    b, b2 = torch.tensor([[-0.6, 0.8]]), torch.tensor([[0.6, -0.8]])
    after = box_contrastive_loss(
        torch.cat([q, b]),
        torch.tensor([0, 1, BACKGROUND_ID]),
        torch.cat([k, b2]),
        torch.tensor([0, BACKGROUND_ID]),
        0.5,
    )
    extra0 = math.exp(-1.2) + math.exp(1.2)  # q0.b = -0.6, q0.b' = 0.6
    extra1 = math.exp(1.6) + math.exp(-1.6)  # q1.b = 0.8, q1.b' = -0.8
    loss0 = -math.log(math.exp(1.6) / (math.exp(1.6) + 1.0 + extra0))
    loss1 = -math.log(math.exp(2.0) / (math.exp(2.0) + 1.0 + math.exp(1.2) + extra1))
    assert float(after) == pytest.approx((loss0 + loss1) / 2, rel=1e-6)
    assert float(after) > float(before)
    only_background = box_contrastive_loss(b.requires_grad_(), torch.tensor([BACKGROUND_ID]), k, k_ids, 0.5)
    assert float(only_background.detach()) == 0.0 and only_background.requires_grad


def test_box_contrastive_loss_without_online_samples_is_zero_and_connected():
    q = torch.zeros(0, 4, requires_grad=True)
    loss = box_contrastive_loss(q, torch.zeros(0, dtype=torch.int64), torch.randn(3, 4), torch.arange(3), 0.5)
    assert float(loss.detach()) == 0.0 and loss.requires_grad


# ---- momentum ----


def test_momentum_schedule_rises_from_base_to_one_on_a_cosine():
    assert momentum_at(0.0, 0.996) == pytest.approx(0.996)
    assert momentum_at(0.5, 0.996) == pytest.approx(0.998)
    assert momentum_at(1.0, 0.996) == pytest.approx(1.0)
    assert momentum_at(0.25, 0.996) == pytest.approx(1 - 0.004 * (math.cos(math.pi / 4) + 1) / 2)


def test_update_momentum_averages_parameters_and_copies_buffers():
    model = wrap(tiny_detr(), freeze_backbone=False)
    online_w = model.detector.query_embed.weight
    target_w = model.momentum_detector.query_embed.weight
    with torch.no_grad():
        online_w.fill_(1.0)
        target_w.fill_(0.0)
        model.projectors["detr"][0].bias.fill_(2.0)
        model.momentum_projectors["detr"][0].bias.fill_(1.0)
        model.detector.backbone.body.bn1.running_mean.fill_(5.0)
    m = model.update_momentum(0.0)
    assert m == pytest.approx(0.996)
    assert torch.allclose(target_w, torch.full_like(target_w, 0.004))  # 0.996 * 0 + 0.004 * 1
    bias = model.momentum_projectors["detr"][0].bias
    assert torch.allclose(bias, torch.full_like(bias, 0.996 * 1.0 + 0.004 * 2.0))
    assert torch.all(model.momentum_detector.backbone.body.bn1.running_mean == 5.0)
    before = target_w.detach().clone()
    assert model.update_momentum(1.0) == pytest.approx(1.0)
    assert torch.equal(target_w, before)  # m = 1 at the end: the momentum copy no longer moves


def test_momentum_copy_is_never_trained():
    model = wrap(tiny_detr())
    assert not any(p.requires_grad for p in model.momentum_detector.parameters())
    assert not any(p.requires_grad for p in model.momentum_projectors.parameters())
    assert any(p.requires_grad for p in model.projectors.parameters())


# ---- ids and order ----


class IdRecorder(torch.nn.Module):
    """A detector stub speaking the align protocol: one branch whose features are a learned embedding of the id."""

    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Linear(1, 1)
        self.embed = torch.nn.Embedding(64, 8)
        self.seen: list[list[torch.Tensor]] = []

    def align_feature_dims(self):
        return {"stub": 8}

    def align_drop_keys(self, options):
        return ["embed"]

    def align_outputs(self, images, targets, with_losses, options):
        self.seen.append([t["ids"].clone() for t in targets])
        ids = torch.cat([t["ids"] for t in targets])
        losses = {"stub/loss_box": self.backbone.weight.sum() * 0} if with_losses else {}
        return AlignOutputs(features={"stub": self.embed(ids)}, ids={"stub": ids}, losses=losses)


def test_aligndet_gives_the_detector_ids_unique_across_the_batch_and_shared_between_views():
    model = wrap(IdRecorder())
    images = [torch.rand(3, 8, 8), torch.rand(3, 8, 8)]
    t1 = [{"ids": torch.tensor([0, 1, 2])}, {"ids": torch.tensor([0, 1])}]
    t2 = [{"ids": torch.tensor([2, 0])}, {"ids": torch.tensor([1])}]  # view 2 kept other proposals (a crop)
    losses = model(images, t1, images, t2)
    online_seen, momentum_seen = model.detector.seen[0], model.momentum_detector.seen[0]
    assert [x.tolist() for x in online_seen] == [[0, 1, 2], [3, 4]]
    assert [x.tolist() for x in momentum_seen] == [[2, 0], [4]]
    assert set(losses) == {"stub/loss_box", "align/loss_contrastive_stub"}


def test_detr_align_rows_follow_images_in_batch_order():
    """Each image's matched features and ids are the same in a two-image batch as alone (equal sizes: no padding)."""
    model = tiny_detr().eval()
    images, _ = two_tiny_images()
    boxes = [
        torch.tensor([[8.0, 10.0, 40.0, 50.0], [2.0, 2.0, 20.0, 30.0]]),
        torch.tensor([[4.0, 6.0, 28.0, 26.0], [34.0, 30.0, 60.0, 58.0], [10.0, 40.0, 30.0, 60.0]]),
    ]
    batch_targets = proposal_targets(boxes)
    batch_targets[1]["ids"] = batch_targets[1]["ids"] + 2  # as batch_unique_ids would offset them
    with torch.no_grad():
        both = model.align_outputs(images, batch_targets, with_losses=False)
        alone = [model.align_outputs([images[i]], [batch_targets[i]], with_losses=False) for i in range(2)]
    ids = both.ids["detr"]
    num_layers = model.transformer.num_decoder_layers
    assert len(ids) == num_layers * 5  # every proposal matched once per decoder layer (10 queries >= 3)
    for layer in range(num_layers):
        block = ids[layer * 5 : (layer + 1) * 5]
        assert sorted(block[:2].tolist()) == [0, 1] and sorted(block[2:].tolist()) == [2, 3, 4]
    for i in range(2):
        for row, proposal in enumerate(alone[i].ids["detr"].tolist()):
            match = (ids == proposal).nonzero().squeeze(1)
            layer_of_row = row // len(boxes[i])
            assert torch.allclose(both.features["detr"][match[layer_of_row]], alone[i].features["detr"][row], atol=1e-4)


def test_detr_background_rows_are_the_unmatched_queries_of_every_labelled_layer_up_to_the_cap():
    model = tiny_detr()
    images, targets = two_tiny_images()
    proposals = proposal_targets([t["boxes"] for t in targets])
    num_layers, num_queries = model.transformer.num_decoder_layers, model.num_queries
    with torch.no_grad():
        plain = model.align_outputs(images, proposals, False, AlignOptions())
        torch.manual_seed(0)
        full = model.align_outputs(images, proposals, False, AlignOptions(max_background=10_000))
        capped = model.align_outputs(images, proposals, False, AlignOptions(max_background=7))
        last = model.align_outputs(images, proposals, False, AlignOptions(all_layers=False, max_background=10_000))
    assert (plain.ids["detr"] != BACKGROUND_ID).all()
    matched = len(plain.ids["detr"])  # 3 proposals x every layer
    ids = full.ids["detr"]
    assert torch.equal(ids[:matched], plain.ids["detr"])
    assert torch.equal(full.features["detr"][:matched], plain.features["detr"])
    assert (ids[matched:] == BACKGROUND_ID).all() and len(ids) == num_layers * 2 * num_queries
    # Unmatched queries only: no background row equals a matched row's hidden state.
    assert torch.cdist(full.features["detr"][matched:], plain.features["detr"]).min() > 0
    assert int((capped.ids["detr"] == BACKGROUND_ID).sum()) == 7
    assert int((last.ids["detr"] == BACKGROUND_ID).sum()) == 2 * num_queries - 3


def test_with_background_draws_a_random_subset_from_the_global_rng():
    feats, ids = torch.zeros(2, 3), torch.tensor([4, 5])
    background = torch.arange(30.0).view(10, 3)
    torch.manual_seed(1)
    f1, i1 = with_background(feats, ids, background, 4)
    torch.manual_seed(1)
    f2, _ = with_background(feats, ids, background, 4)
    assert torch.equal(f1, f2) and i1.tolist() == [4, 5, -1, -1, -1, -1]
    assert len({tuple(r) for r in f1[2:].tolist()}) == 4 and all(r[0] % 3 == 0 for r in f1[2:].tolist())
    f_all, _ = with_background(feats, ids, background, 100)
    assert torch.equal(f_all[2:], background)
    with pytest.raises(ValueError, match="max_background -1"):
        with_background(feats, ids, background, -1)


def test_aligndet_hands_its_background_cap_to_the_detector():
    detector = tiny_detr()
    images, targets = two_tiny_images()
    proposals = proposal_targets([t["boxes"] for t in targets])
    for cap in (0, 5):
        model = wrap(detector, freeze_backbone=False, max_background=cap)
        assert model.options.max_background == cap
        with torch.no_grad():
            out = model.align_outputs(model.detector, images, proposals, with_losses=False)
        assert int((out.ids["detr"] == BACKGROUND_ID).sum()) == cap


def test_detr_align_last_layer_only_labels_one_query_per_proposal():
    model = tiny_detr()
    images, targets = two_tiny_images()
    last_layer = AlignOptions(all_layers=False)
    out = model.align_outputs(images, proposal_targets([t["boxes"] for t in targets]), True, last_layer)
    assert sorted(out.ids["detr"].tolist()) == [0, 0, 1]
    assert out.features["detr"].shape == (3, model.transformer.d_model)
    # Box losses on every decoder layer, no classification loss.
    assert set(out.losses) == {"detr/loss_bbox", "detr/loss_giou", "detr/loss_bbox_d0", "detr/loss_giou_d0"}


def test_detr_drop_keys_name_the_class_heads_and_the_last_box_layers_as_the_reference():
    model = tiny_detr()
    keys = model.align_drop_keys()
    state = model.state_dict()
    dropped = {k for k in state if any(drop_matches(k, d) for d in keys)}
    class_heads = {k for k in state if k.startswith("class_embed.")}
    last_box_layers = {
        f"bbox_embed.{layer}.{linear}.{p}"
        for layer in range(len(model.bbox_embed))
        for linear in [max(int(k.split(".")[2]) for k in state if k.startswith(f"bbox_embed.{layer}."))]
        for p in ("weight", "bias")
    }
    assert dropped == class_heads | last_box_layers
    assert model.align_feature_dims() == {"detr": model.transformer.d_model}


def test_detr_objectness_trains_every_class_logit_on_the_matched_queries_and_keeps_the_class_heads():
    model = tiny_detr()
    images, targets = two_tiny_images()
    proposals = proposal_targets([t["boxes"] for t in targets])
    objectness = AlignOptions(all_layers=False, objectness=True)
    out = model.align_outputs(images, proposals, True, objectness)
    names = {"detr/loss_objectness", "detr/loss_objectness_d0"}
    assert names <= set(out.losses)
    model.zero_grad()
    out.losses["detr/loss_objectness"].backward()
    last = model.class_embed[-1]
    assert last.weight.grad is not None and last.weight.grad.abs().sum() > 0
    # Every class has the same target, so permuting the classes of the heads leaves the loss unchanged (the
    # box-only matching does not read the logits).
    with torch.no_grad():
        for head in model.class_embed:
            head.weight.copy_(head.weight.flip(0))
            head.bias.copy_(head.bias.flip(0))
        permuted = model.align_outputs(images, proposals, True, objectness)
    for name in names:
        assert torch.allclose(permuted.losses[name], out.losses[name], rtol=1e-5)
    without = model.align_outputs(images, proposals, True, AlignOptions(all_layers=False))
    assert not names & set(without.losses)
    kept = model.align_drop_keys(objectness)
    assert not any(drop_matches(k, d) for k in model.state_dict() if k.startswith("class_embed.") for d in kept)


def pseudo_class_targets(boxes: list[torch.Tensor], labels: list[list[int]]) -> list[dict[str, torch.Tensor]]:
    targets = proposal_targets(boxes)
    for target, image_labels in zip(targets, labels):
        target["labels"] = torch.tensor(image_labels, dtype=torch.int64)
    return targets


def test_detr_pseudo_classes_train_every_class_head_on_the_cluster_ids_and_drop_them():
    model = tiny_detr(num_classes=4)
    images, targets = two_tiny_images()
    proposals = pseudo_class_targets([t["boxes"] for t in targets], [[3], [1, 2]])
    pseudo = AlignOptions(pseudo_classes=True)
    out = model.align_outputs(images, proposals, True, pseudo)
    assert {"detr/loss_cls", "detr/loss_cls_d0", "detr/loss_bbox", "detr/loss_giou_d0"} <= set(out.losses)
    model.zero_grad()
    (out.losses["detr/loss_cls"] + out.losses["detr/loss_cls_d0"]).backward()
    for head in model.class_embed:
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    # The class heads learn which cluster each proposal is: other ids, other loss.
    relabelled = pseudo_class_targets([t["boxes"] for t in targets], [[0], [0, 0]])
    with torch.no_grad():
        other = model.align_outputs(images, relabelled, True, pseudo)
    assert not torch.allclose(other.losses["detr/loss_cls"], out.losses["detr/loss_cls"])
    # Without the option: box losses only, whatever the labels.
    box_only = model.align_outputs(images, proposals, True, AlignOptions())
    assert not any("loss_cls" in k for k in box_only.losses)
    drops = model.align_drop_keys(pseudo)
    class_keys = [k for k in model.state_dict() if k.startswith("class_embed.")]
    assert class_keys and all(any(drop_matches(k, d) for d in drops) for k in class_keys)


def test_detr_pseudo_classes_match_with_the_class_cost(monkeypatch):
    model = tiny_detr(num_classes=4)
    images, targets = two_tiny_images()
    proposals = pseudo_class_targets([t["boxes"] for t in targets], [[3], [1, 2]])
    matcher = model.criterion.matcher
    matcher_type = type(matcher)
    match = matcher_type.match_layers
    class_costs = []

    def spy(self, logits, boxes, targets, valid=None):
        class_costs.append(self.cost_class)
        return match(self, logits, boxes, targets, valid)

    monkeypatch.setattr(matcher_type, "match_layers", spy)
    model.align_outputs(images, proposals, False, AlignOptions(pseudo_classes=True))
    assert class_costs and all(cost == matcher.cost_class > 0 for cost in class_costs)
    class_costs.clear()
    model.align_outputs(images, proposals, False, AlignOptions())
    assert class_costs and all(cost == 0 for cost in class_costs)


def test_two_stage_detr_pseudo_classes_keep_the_encoder_proposals_one_class():
    model = tiny_detr(num_classes=4, overrides=("model.detector.two_stage=true",))
    images, targets = two_tiny_images()
    proposals = pseudo_class_targets([t["boxes"] for t in targets], [[3], [1, 2]])
    out = model.align_outputs(images, proposals, True, AlignOptions(pseudo_classes=True))
    assert {"detr/loss_cls", "detr/loss_cls_enc", "detr/loss_bbox_enc"} <= set(out.losses)
    assert model.enc_class_embed.out_features == 1


def test_detr_pseudo_classes_outside_the_class_heads_are_an_error():
    model = tiny_detr(num_classes=2)
    images, targets = two_tiny_images()
    proposals = pseudo_class_targets([t["boxes"] for t in targets], [[0], [1, 2]])
    with pytest.raises(ValueError, match="image 1 of the batch has pseudo-classes in \\[1, 2\\]; expected 0..1"):
        model.align_outputs(images, proposals, True, AlignOptions(pseudo_classes=True))


def test_pseudo_classes_and_objectness_exclude_each_other():
    with pytest.raises(ValueError, match="objectness and pseudo_classes"):
        AlignOptions(objectness=True, pseudo_classes=True)


@pytest.mark.parametrize("model_name", ["fcos", "retinanet", "faster_rcnn"])
def test_detectors_outside_the_detr_family_reject_pseudo_classes(model_name):
    from stages.build import build_model

    cfg = compose_config(["experiment=smoke", f"model={model_name}"])
    model = build_model(cfg.model, 4)
    images, targets = two_tiny_images(96)
    with pytest.raises(ValueError, match="pseudo-classes train a DETR-family class head"):
        model.align_outputs(
            images, proposal_targets([t["boxes"] for t in targets]), False, AlignOptions(pseudo_classes=True)
        )


def test_two_stage_detr_also_trains_its_class_agnostic_encoder_proposals():
    model = tiny_detr(overrides=("model.detector.two_stage=true",))
    images, targets = two_tiny_images()
    out = model.align_outputs(images, proposal_targets([t["boxes"] for t in targets]), True)
    assert {"detr/loss_cls_enc", "detr/loss_bbox_enc", "detr/loss_giou_enc"} <= set(out.losses)
    drops = model.align_drop_keys()
    assert not any(drop_matches(k, d) for k in model.state_dict() if k.startswith("enc_") for d in drops)


def test_co_detr_aux_branches_carry_proposal_ids_image_by_image():
    from stages.build import build_model

    cfg = compose_config(["experiment=smoke", "model=co_deformable_detr"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 3)
    images, _ = two_tiny_images(96)
    boxes = [
        torch.tensor([[8.0, 10.0, 60.0, 70.0], [2.0, 2.0, 40.0, 30.0]]),
        torch.tensor([[4.0, 6.0, 48.0, 46.0], [44.0, 40.0, 90.0, 88.0], [10.0, 50.0, 40.0, 90.0]]),
    ]
    targets = proposal_targets(boxes)
    targets[1]["ids"] = targets[1]["ids"] + 2
    out = model.align_outputs(images, targets, with_losses=True)
    dims = model.align_feature_dims()
    assert set(out.features) == set(dims) == {"detr", *model.aux_head_names}
    for name in model.aux_head_names:
        feats, ids = out.features[name], out.ids[name]
        assert feats.shape == (len(ids), dims[name]) and len(ids) > 0
        assert set(ids.tolist()) <= {0, 1, 2, 3, 4}
        second = (ids >= 2).int()
        assert torch.all(second[1:] >= second[:-1])  # image 0's rows first, then image 1's
        assert f"{name}/loss_cls" not in out.losses
        assert f"{name}/loss_bbox" in out.losses
    keys = model.align_drop_keys()
    assert {"aux_heads.0.tower.cls_pred.", "aux_heads.0.tower.reg_pred.", "aux_heads.1.box_predictor."} <= set(keys)


def test_co_detr_pseudo_classes_reach_the_detr_branch_while_aux_heads_keep_one_class(monkeypatch):
    from stages.build import build_model

    cfg = compose_config(["experiment=smoke", "model=co_deformable_detr"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 4)
    images, _ = two_tiny_images(96)
    boxes = [torch.tensor([[8.0, 10.0, 60.0, 70.0]]), torch.tensor([[4.0, 6.0, 48.0, 46.0], [44.0, 40.0, 90.0, 88.0]])]
    aux_labels = []
    run_aux_heads = model.run_aux_heads

    def spy(encoded, image_sizes, targets):
        aux_labels.extend(t["labels"] for t in targets)
        return run_aux_heads(encoded, image_sizes, targets)

    monkeypatch.setattr(model, "run_aux_heads", spy)
    out = model.align_outputs(
        images, pseudo_class_targets(boxes, [[3], [1, 2]]), True, AlignOptions(pseudo_classes=True)
    )
    assert "detr/loss_cls" in out.losses
    assert aux_labels and all(int(labels.abs().sum()) == 0 for labels in aux_labels)
    assert not any(k.startswith("aux") and k.endswith("loss_cls") for k in out.losses)


# ---- the frozen backbone ----


def one_training_step(model: AlignDet) -> None:
    images, targets = two_tiny_images()
    proposals = proposal_targets([t["boxes"] for t in targets])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = model(images, proposals, images, proposals)
    optimizer.zero_grad()
    sum(v for k, v in losses.items() if k.rsplit("/", 1)[-1].startswith("loss")).backward()
    optimizer.step()


def test_aligndet_hands_pseudo_classes_to_the_detector_and_its_class_heads_learn():
    model = wrap(tiny_detr(num_classes=4), freeze_backbone=True, detr_pseudo_classes=True)
    assert model.options.pseudo_classes
    images, targets = two_tiny_images()
    proposals = pseudo_class_targets([t["boxes"] for t in targets], [[3], [1, 2]])
    model.train()
    losses = model(images, proposals, images, proposals)
    assert "detr/loss_cls" in losses and "align/loss_contrastive_detr" in losses
    sum(losses.values()).backward()
    assert model.detector.class_embed[-1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_backbone_keeps_the_backbone_as_it_is(freeze):
    model = wrap(tiny_detr(), freeze_backbone=freeze)
    backbone_before = {k: v.clone() for k, v in model.detector.backbone.state_dict().items()}
    neck_before = {k: v.clone() for k, v in model.detector.neck.state_dict().items()}
    one_training_step(model)
    backbone_after = model.detector.backbone.state_dict()
    unchanged = all(torch.equal(backbone_before[k], backbone_after[k]) for k in backbone_before)
    assert unchanged == freeze  # weights and BatchNorm statistics alike
    assert any(not torch.equal(neck_before[k], v) for k, v in model.detector.neck.state_dict().items())
