"""The one prior generator and the one set of assigners reproduce torchvision's components where the standalone
detectors follow torchvision (and mmdet's where the Co-DETR heads follow mmdet)."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

from models.heads.rcnn import ProposalNetwork
from models.matching.assigners import BACKGROUND, FCOSAssigner, MaxIoUAssigner
from models.matching.priors import StrideAnchorGenerator, StridePointGenerator, TorchvisionAnchors


def iou_matrices() -> list[torch.Tensor]:
    """Random IoU matrices [G, A] with ties, a box overlapping nothing, and values on the thresholds."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(20):
        iou = (torch.rand(4, 50, generator=g) * 10).round() / 10  # coarse values: many ties, some 0.3 / 0.7
        iou[torch.rand(4, 50, generator=g) < 0.5] = 0.0
        iou[3] = 0.0  # a box with no overlap at all
        out.append(iou)
    return out


@pytest.mark.parametrize("low_quality", [True, False])
def test_max_iou_in_torchvisions_convention_is_torchvisions_matcher(low_quality):
    ours = MaxIoUAssigner(0.7, 0.3, low_quality="torchvision" if low_quality else None)
    theirs = Matcher(0.7, 0.3, allow_low_quality_matches=low_quality)
    for iou in iou_matrices():
        assert torch.equal(ours(iou), theirs(iou))
    assert (ours.BELOW_LOW_THRESHOLD, ours.BETWEEN_THRESHOLDS) == (
        theirs.BELOW_LOW_THRESHOLD,
        theirs.BETWEEN_THRESHOLDS,
    )


def test_max_iou_conventions_differ_on_which_box_a_low_quality_prior_takes():
    # Prior 0 is box 1's best match, but its own best box is box 0 (IoU .6 below pos 0.7): mmdet gives it to box 1
    # (the claiming box), torchvision to box 0 (its own best).
    iou = torch.tensor([[0.6, 0.9], [0.5, 0.1]])
    assert MaxIoUAssigner(0.7, 0.3, low_quality="mmdet")(iou).tolist() == [1, 0]
    assert MaxIoUAssigner(0.7, 0.3, low_quality="torchvision")(iou).tolist() == [0, 0]


def test_fcos_conventions_differ_only_on_the_regress_range_bounds():
    # One point at (16, 16) of stride 8; a box whose largest point-to-side distance is exactly 16.
    points, strides = torch.tensor([[16.0, 16.0]]), torch.tensor([8.0])
    box = torch.tensor([[0.0, 0.0, 32.0, 32.0]])
    on_bound = torch.tensor([[0.0, 16.0]])
    inside = torch.tensor([[0.0, 17.0]])
    for ranges, mmdet, torchvision in ((on_bound, [0], [BACKGROUND]), (inside, [0], [0])):
        assert FCOSAssigner(True, 1.5, "mmdet").assign(points, strides, ranges, box).tolist() == mmdet
        assert FCOSAssigner(True, 1.5, "torchvision").assign(points, strides, ranges, box).tolist() == torchvision


def test_fcos_points_are_torchvisions_one_stride_anchors():
    strides = [8, 16, 32]
    maps = [torch.zeros(1, 4, 96 // s, 128 // s) for s in strides]
    image_list = ImageList(torch.zeros(1, 3, 96, 128), [(90, 120)])
    ours = TorchvisionAnchors(StridePointGenerator(strides, center_offset=0.0, box_scale=1.0))(image_list, maps)[0]
    theirs = AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * 3)(image_list, maps)[0]
    assert torch.equal(ours, theirs)


def test_octave_anchors_are_stride_multiples_in_mmdets_order():
    anchors = StrideAnchorGenerator.from_octave_scales([8, 16], 4, 2, [0.5, 1.0], center_offset=0.0)
    priors = anchors([(1, 1), (1, 1)], torch.device("cpu"))
    sides = ((priors.boxes[:, 2] - priors.boxes[:, 0]) * (priors.boxes[:, 3] - priors.boxes[:, 1])).sqrt()
    expected = [32.0, 32.0 * 2**0.5, 32.0, 32.0 * 2**0.5]  # ratio-major: (0.5: 2^0, 2^0.5), (1.0: ...)
    torch.testing.assert_close(sides, torch.tensor(expected + [2 * s for s in expected]))


def test_proposal_network_losses_are_torchvisions_at_their_smooth_l1_beta():
    torch.manual_seed(0)
    anchors = StrideAnchorGenerator.from_sizes([8, 16], [[16.0], [32.0]], [0.5, 1.0, 2.0])
    ours = ProposalNetwork(
        RPNHead(4, 3),
        anchors,
        MaxIoUAssigner(0.7, 0.3, low_quality="torchvision"),
        32,
        0.5,
        {"training": 50, "testing": 50},
        {"training": 20, "testing": 20},
        0.7,
    )
    theirs = RegionProposalNetwork(None, ours.head, 0.7, 0.3, 32, 0.5, {"training": 50}, {"training": 20}, 0.7)
    g = torch.Generator().manual_seed(1)
    objectness, deltas = torch.randn(200, 1, generator=g), torch.randn(200, 4, generator=g)
    labels = [torch.randint(-1, 2, (100,), generator=g).float() for _ in range(2)]
    targets = [torch.randn(100, 4, generator=g) for _ in range(2)]
    torch.manual_seed(2)
    got = ours.compute_loss(objectness, deltas, labels, targets)
    torch.manual_seed(2)
    want = theirs.compute_loss(objectness, deltas, labels, targets)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
