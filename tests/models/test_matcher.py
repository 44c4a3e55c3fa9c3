"""HungarianMatcher: optimal assignments, box-only costs, fp32 costs and clear errors on NaN."""

import itertools

import pytest
import torch

from models.matching.hungarian import HungarianMatcher


def _random_boxes(n: int, g: torch.Generator) -> torch.Tensor:
    centre = 0.2 + 0.6 * torch.rand(n, 2, generator=g)
    size = 0.05 + 0.3 * torch.rand(n, 2, generator=g)
    return torch.cat([centre, size], -1)


def _matcher(cost_class: float = 2.0) -> HungarianMatcher:
    return HungarianMatcher(cost_class=cost_class, cost_bbox=5.0, cost_giou=2.0, focal_alpha=0.25, focal_gamma=2.0)


@pytest.mark.parametrize("seed", range(6))
def test_hungarian_assignment_equals_brute_force_optimum(seed):
    g = torch.Generator().manual_seed(seed)
    num_queries, num_classes = 5, 3
    counts = [0, 1, 3, 5][seed % 4 :] + [2]
    batch = len(counts)
    logits = torch.randn(batch, num_queries, num_classes, generator=g)
    boxes = torch.stack([_random_boxes(num_queries, g) for _ in range(batch)])
    targets = [
        {"labels": torch.randint(0, num_classes, (n,), generator=g), "boxes": _random_boxes(n, g)} for n in counts
    ]
    matcher = _matcher()
    indices = matcher(logits, boxes, targets)
    for i, (target, (pred, tgt)) in enumerate(zip(targets, indices)):
        n = len(target["labels"])
        assert len(pred) == len(tgt) == n
        if n == 0:
            continue
        cost = sum(matcher.cost_terms(logits[i], boxes[i], target["labels"], target["boxes"]).values())
        best_total, best = min(
            (float(sum(cost[q, t] for t, q in enumerate(perm))), perm)
            for perm in itertools.permutations(range(num_queries), n)
        )
        assert float(cost[pred, tgt].sum()) == pytest.approx(best_total, rel=1e-5, abs=1e-5)
        assert dict(zip(tgt.tolist(), pred.tolist())) == dict(enumerate(best))


def test_box_only_cost_recovers_a_permutation_without_logits():
    g = torch.Generator().manual_seed(0)
    boxes = _random_boxes(6, g)
    perm = torch.tensor([4, 0, 5, 2])
    targets = [{"labels": torch.zeros(4, dtype=torch.int64), "boxes": boxes[perm]}]
    ((pred, tgt),) = _matcher(cost_class=0.0)(None, boxes[None], targets)
    assert pred[tgt.argsort()].tolist() == perm.tolist()


def test_valid_mask_keeps_masked_predictions_out_of_the_assignment():
    g = torch.Generator().manual_seed(1)
    boxes = _random_boxes(4, g)
    targets = [{"labels": torch.zeros(1, dtype=torch.int64), "boxes": boxes[2:3]}]
    valid = torch.tensor([[True, True, False, True]])
    ((pred, _),) = _matcher(cost_class=0.0)(None, boxes[None], targets, valid)
    assert pred.tolist() != [2] and len(pred) == 1


def test_empty_targets_give_empty_int64_indices():
    ((pred, tgt),) = _matcher()(
        torch.randn(1, 3, 2),
        torch.rand(1, 3, 4),
        [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}],
    )
    assert pred.dtype == tgt.dtype == torch.int64 and len(pred) == len(tgt) == 0


@pytest.mark.parametrize(("broken", "term"), [("boxes", "cost_bbox"), ("logits", "cost_class")])
def test_nan_in_a_cost_raises_naming_matcher_and_term(broken, term):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 4, 2, generator=g)
    boxes = _random_boxes(4, g)[None]
    if broken == "boxes":
        boxes[0, 1, 0] = float("nan")
    else:
        logits[0, 3, 1] = float("nan")
    targets = [{"labels": torch.tensor([1]), "boxes": _random_boxes(1, g)}]
    with pytest.raises(FloatingPointError, match=f"HungarianMatcher.*{term}"):
        _matcher()(logits, boxes, targets)


def test_costs_are_float32_for_half_precision_inputs_under_autocast():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 6, 3, generator=g).bfloat16()
    boxes = torch.stack([_random_boxes(6, g), _random_boxes(6, g)]).bfloat16()
    targets = [{"labels": torch.tensor([0, 2]), "boxes": _random_boxes(2, g)} for _ in range(2)]
    matcher = _matcher()
    expected = matcher(logits.float(), boxes.float(), targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = matcher(logits, boxes, targets)
    terms = matcher.cost_terms(logits[0], boxes[0], targets[0]["labels"], targets[0]["boxes"])
    assert all(t.dtype == torch.float32 for t in terms.values())
    for (p1, t1), (p2, t2) in zip(expected, got):
        assert torch.equal(p1, p2) and torch.equal(t1, t2)


def test_matching_all_layers_at_once_equals_one_layer_at_a_time():
    g = torch.Generator().manual_seed(4)
    num_layers, num_queries, num_classes = 3, 7, 4
    counts = [3, 0, 5]
    logits = torch.randn(num_layers, len(counts), num_queries, num_classes, generator=g)
    boxes = torch.stack([torch.stack([_random_boxes(num_queries, g) for _ in counts]) for _ in range(num_layers)])
    targets = [
        {"labels": torch.randint(0, num_classes, (n,), generator=g), "boxes": _random_boxes(n, g)} for n in counts
    ]
    valid = torch.rand(len(counts), num_queries, generator=g) > 0.3
    matcher = _matcher()
    for mask in (None, valid):
        together = matcher.match_layers(logits, boxes, targets, mask)
        assert len(together) == num_layers
        for layer, assignment in enumerate(together):
            alone = matcher(logits[layer], boxes[layer], targets, mask)
            assert len(assignment) == len(alone) == len(counts)
            for (p1, t1), (p2, t2) in zip(assignment, alone):
                assert torch.equal(p1, p2) and torch.equal(t1, t2)
            if mask is not None:
                assert all(bool(mask[i, pred].all()) for i, (pred, _) in enumerate(assignment))


def test_matching_all_layers_copies_the_costs_to_the_host_once(monkeypatch):
    """On a GPU each copy to the host waits for the device: one copy per call, whatever the layers and images."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 3, 6, 2, generator=g)
    boxes = torch.stack([torch.stack([_random_boxes(6, g) for _ in range(3)]) for _ in range(4)])
    targets = [{"labels": torch.tensor([0, 1]), "boxes": _random_boxes(2, g)} for _ in range(3)]
    copies = []
    to_host = torch.Tensor.cpu

    def counting_cpu(self, *args, **kwargs):
        copies.append(tuple(self.shape))
        return to_host(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    indices = _matcher().match_layers(logits, boxes, targets)
    assert len(indices) == 4 and all(len(layer) == 3 for layer in indices)
    assert copies == [(4 * 6 * 2 * 3,)]
