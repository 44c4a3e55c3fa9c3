"""SetCriterion: weighted focal / L1 / GIoU losses, given assignments, layer suffixes and errors."""

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from models.losses.detr_loss import SetCriterion
from models.matching.hungarian import HungarianMatcher

WEIGHTS = {"loss_cls": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}


def _criterion(cost_class: float = 2.0) -> SetCriterion:
    matcher = HungarianMatcher(cost_class=cost_class, cost_bbox=5.0, cost_giou=2.0, focal_alpha=0.25, focal_gamma=2.0)
    return SetCriterion(matcher, focal_alpha=0.25, focal_gamma=2.0, **WEIGHTS)


def _targets() -> list[dict[str, torch.Tensor]]:
    return [
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]])},
        {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
    ]


def test_given_assignment_with_exact_boxes_has_zero_box_losses():
    targets = _targets()
    boxes = torch.rand(2, 4, 4) * 0.3 + 0.2
    boxes[0, 3] = targets[0]["boxes"][0]
    boxes[1, 0] = targets[1]["boxes"][1]
    boxes[1, 2] = targets[1]["boxes"][0]
    indices = [(torch.tensor([3]), torch.tensor([0])), (torch.tensor([0, 2]), torch.tensor([1, 0]))]
    losses = _criterion().loss_for_assignment(torch.randn(2, 4, 3), boxes, targets, indices, num_boxes=3.0)
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0.0, abs=1e-4)
    assert losses["loss_cls"].item() > 0


def test_given_assignment_treats_every_other_query_as_background():
    targets = _targets()
    logits = torch.randn(2, 4, 3)
    boxes = torch.rand(2, 4, 4) * 0.3 + 0.2
    indices = [(torch.tensor([1]), torch.tensor([0])), (torch.tensor([3, 0]), torch.tensor([0, 1]))]
    onehot = torch.zeros_like(logits)
    onehot[0, 1, 1] = onehot[1, 3, 0] = onehot[1, 0, 2] = 1
    expected = WEIGHTS["loss_cls"] * sigmoid_focal_loss(logits, onehot, 0.25, 2.0, reduction="sum") / 3.0
    criterion = _criterion()
    losses = criterion.loss_for_assignment(logits, boxes, targets, indices, num_boxes=3.0)
    assert losses["loss_cls"].item() == pytest.approx(expected.item(), rel=1e-5)
    moved = boxes.clone()
    moved[0, 2] = torch.tensor([0.9, 0.9, 0.1, 0.1])  # an unassigned query: no box loss
    again = criterion.loss_for_assignment(logits, moved, targets, indices, num_boxes=3.0)
    assert again["loss_bbox"].item() == pytest.approx(losses["loss_bbox"].item())


def test_losses_are_normalised_by_the_number_of_target_boxes():
    torch.manual_seed(0)
    targets = _targets()
    logits, boxes = torch.randn(2, 2, 5, 3), torch.rand(2, 2, 5, 4) * 0.3 + 0.2
    criterion = _criterion()
    single = criterion(logits, boxes, targets)
    doubled = criterion(torch.cat([logits, logits], 1), torch.cat([boxes, boxes], 1), targets + targets)
    for name, value in single.items():
        assert doubled[name].item() == pytest.approx(value.item(), rel=1e-5), name


def test_forward_names_last_earlier_and_encoder_layers():
    logits, boxes = torch.randn(3, 2, 5, 3), torch.rand(3, 2, 5, 4) * 0.3 + 0.2
    enc_logits, enc_boxes = torch.randn(2, 7, 1), torch.rand(2, 7, 4) * 0.3 + 0.2
    losses = _criterion()(logits, boxes, _targets(), enc_logits, enc_boxes, torch.ones(2, 7, dtype=torch.bool))
    names = ["loss_cls", "loss_bbox", "loss_giou"]
    expected = {f"{n}{s}" for n in names for s in ("", "_d0", "_d1", "_enc")}
    assert set(losses) == expected


def test_images_without_boxes_give_finite_losses_with_gradients():
    logits = torch.randn(1, 2, 4, 3, requires_grad=True)
    boxes = (torch.rand(1, 2, 4, 4) * 0.3 + 0.2).requires_grad_()
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    losses = _criterion()(logits, boxes, empty)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert logits.grad.abs().sum() > 0


def test_non_finite_loss_raises_naming_the_term():
    logits = torch.randn(2, 2, 4, 3)
    logits[0, 0, 2, 1] = float("nan")
    boxes = torch.rand(2, 2, 4, 4) * 0.3 + 0.2
    with pytest.raises(FloatingPointError, match="loss_cls_d0"):
        _criterion(cost_class=0.0)(logits, boxes, _targets())


def test_layer_losses_equal_each_layer_on_its_own():
    """All layers in one pass, each with its own assignment, give each layer's losses alone (no mixing)."""
    torch.manual_seed(1)
    targets = _targets()
    logits, boxes = torch.randn(3, 2, 4, 3), torch.rand(3, 2, 4, 4) * 0.3 + 0.2
    indices = [
        [(torch.tensor([1]), torch.tensor([0])), (torch.tensor([3, 0]), torch.tensor([0, 1]))],
        [(torch.tensor([2]), torch.tensor([0])), (torch.tensor([1, 2]), torch.tensor([1, 0]))],
        [(torch.tensor([0]), torch.tensor([0])), (torch.zeros(0, dtype=torch.int64),) * 2],
    ]
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    criterion = _criterion()
    together = criterion.layer_losses(logits, boxes, targets, indices, 3.0, valid)
    for layer in range(3):
        alone = criterion.layer_losses(
            logits[layer : layer + 1], boxes[layer : layer + 1], targets, [indices[layer]], 3.0, valid
        )
        for name, value in together.items():
            assert value.shape == (3,)
            assert value[layer].item() == pytest.approx(alone[name][0].item(), rel=1e-6, abs=1e-7), (layer, name)
    assert len(set(together["loss_bbox"].tolist())) == 3
