"""Which priors, proposals and queries each detector's assigners make positive, and for which box, on a fixed
batch: the values in tests/data/assignments_before_restructure.json were written by the code before the models/
restructure of issue 17, and must not change.

Pinned: the standalone FCOS points, RetinaNet anchors and Faster R-CNN RPN anchors and RoIs (index -> box);
the four Co-DETR auxiliary heads' positives (`gt_indices`, reference boxes); and the proposal ids of every
AlignDet branch (DETR, Co-DETR with its four heads, FCOS, RetinaNet, Faster R-CNN). Every model is built from
conf/ (Hydra `_target_`s, stages.build, stages.box_pretrain), so the test names no module path inside models/.
"""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate

from models.pretrain.align_outputs import BACKGROUND_ID
from stages.box_pretrain import build_aligndet
from stages.build import build_model
from tests.helpers import ROOT, compose_config

FIXTURE = ROOT / "tests" / "fixtures" / "assignments_before_restructure.json"
NUM_CLASSES = 3
STANDALONE = ["fcos", "retinanet", "faster_rcnn"]
# Box fingerprints are stored to this many decimals and compared to 0.01 (RPN proposals come out of a network).
DECIMALS = 3


pytestmark = pytest.mark.usefixtures("one_thread")


def fixed_batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Two images of different sizes (so the batch is padded) with boxes of several scales, off the pixel grid."""
    g = torch.Generator().manual_seed(17)
    images = [torch.rand(3, 72, 100, generator=g), torch.rand(3, 90, 64, generator=g)]
    targets = [
        {
            "boxes": torch.tensor([[6.5, 4.25, 58.0, 50.5], [40.0, 30.0, 97.5, 70.0], [70.25, 8.0, 86.0, 22.75]]),
            "labels": torch.tensor([0, 2, 1]),
        },
        {"boxes": torch.tensor([[3.0, 12.5, 44.75, 86.0], [30.5, 2.0, 60.0, 30.0]]), "labels": torch.tensor([1, 0])},
    ]
    return images, targets


def positives(matched: list[torch.Tensor]) -> dict[str, list[list[int]]]:
    """Per image: the indices of the positive predictions and the box each was given."""
    index = [torch.nonzero(m >= 0).squeeze(1) for m in matched]
    return {"index": [i.tolist() for i in index], "gt": [m[i].tolist() for m, i in zip(matched, index)]}


def per_box_counts(gt_indices: list[torch.Tensor], num_boxes: list[int]) -> list[list[int]]:
    """Per image: how many positives each ground-truth box got."""
    return [torch.bincount(g, minlength=n).tolist() for g, n in zip(gt_indices, num_boxes)]


def box_fingerprint(boxes: list[torch.Tensor]) -> list[list[float]]:
    """Per image: the sum and the sum of squares / 100 of the positives' box coordinates (which priors or
    proposals, in a few numbers)."""
    return [[round(float(b.sum()), DECIMALS), round(float(b.pow(2).sum()) / 100, DECIMALS)] for b in boxes]


def standalone(kind: str) -> dict:
    cfg = compose_config(["experiment=smoke", f"model={kind}"])
    torch.manual_seed(0)
    model = instantiate(cfg.model.detector, num_classes=NUM_CLASSES).eval()
    images, targets = fixed_batch()
    image_list, tv_targets = model._prepare(images, targets)
    features = model.pyramid(image_list.tensors)
    maps = list(features.values())
    if kind == "fcos":
        points = model.anchor_generator(image_list, maps)
        return {"points": positives(model.match(points, tv_targets, [m.shape[-2] * m.shape[-1] for m in maps]))}
    if kind == "retinanet":
        matched = model.match(model.anchor_generator(image_list, maps), tv_targets)
        return {"anchors": positives(matched), "ignored": [int((m == -2).sum()) for m in matched]}
    anchors = model.rpn.anchor_generator(image_list, maps)
    labels, matched_boxes = model.rpn.assign_targets_to_anchors(anchors, tv_targets)
    rpn = []
    for label, boxes, target in zip(labels, matched_boxes, tv_targets):
        same = (boxes[:, None, :] == target["boxes"][None]).all(dim=2)
        rpn.append(torch.where(label == 1, same.float().argmax(dim=1), torch.where(label == 0, -1, -2)))
    proposals, _ = model.rpn(image_list, features)
    gt_boxes = [t["boxes"] for t in tv_targets]
    rois = model.roi_heads.add_gt_proposals(proposals, gt_boxes)
    matched, roi_labels = model.roi_heads.assign_targets_to_proposals(rois, gt_boxes, [t["labels"] for t in tv_targets])
    roi_matched = [torch.where(lab > 0, m, -1) for m, lab in zip(matched, roi_labels)]
    return {
        "rpn_anchors": positives(rpn),
        "rpn_ignored": [int((m == -2).sum()) for m in rpn],
        "rois": positives(roi_matched),
        "num_rois": [len(r) for r in rois],
    }


def co_detr(num_aux_heads: int = 4):
    cfg = compose_config(["experiment=smoke", "model=co_deformable_detr", f"model.num_aux_heads={num_aux_heads}"])
    torch.manual_seed(0)
    return build_model(cfg.model, NUM_CLASSES).train()


def aux_heads() -> dict:
    """Each auxiliary head alone on seeded random maps of the padded batch (96 x 128) at its strides."""
    model = co_detr()
    images, targets = fixed_batch()
    sizes = [(int(i.shape[1]), int(i.shape[2])) for i in images]
    out = {}
    for name, head in zip(model.aux_head_names, model.aux_heads):
        g = torch.Generator().manual_seed(1)
        maps = [torch.randn(2, head.in_channels, -(-96 // s), -(-128 // s), generator=g) for s in head.strides]
        torch.manual_seed(2)  # the Faster R-CNN head samples RoIs
        _, found = head(maps, head.strides, sizes, targets)
        counts = per_box_counts(found.gt_indices, [len(t["boxes"]) for t in targets])
        out[name] = {"per_box": counts, "boxes": box_fingerprint(found.boxes)}
    return out


def align_ids(model_name: str) -> dict[str, list[int]]:
    """The proposal id of every row of every AlignDet branch, one view (the boxes as proposals, ids 0..4)."""
    cfg = compose_config(["experiment=smoke", f"model={model_name}", "stage=box_pretrain"])
    torch.manual_seed(0)
    detector = co_detr() if model_name == "co_deformable_detr" else build_model(cfg.model, NUM_CLASSES)
    wrapper = build_aligndet(detector, cfg.stage).train()
    images, targets = fixed_batch()
    offset = 0
    proposals = []
    for t in targets:
        n = len(t["boxes"])
        proposals.append(
            {"boxes": t["boxes"], "labels": torch.zeros(n, dtype=torch.int64), "ids": torch.arange(n) + offset}
        )
        offset += n
    torch.manual_seed(3)
    with torch.no_grad():
        out = wrapper.align_outputs(wrapper.detector, images, proposals, with_losses=False)
    # The assigned rows (background samples, added after the restructuring, follow them): the DETR-like branches
    # row by row; the auxiliary heads (pinned above on their own) as rows per id.
    assigned = {branch: ids[ids != BACKGROUND_ID] for branch, ids in sorted(out.ids.items())}
    return {
        branch: ids.tolist() if not branch.startswith("aux") else torch.bincount(ids, minlength=offset).tolist()
        for branch, ids in assigned.items()
    }


def current() -> dict:
    return {
        "standalone": {kind: standalone(kind) for kind in STANDALONE},
        "aux_heads": aux_heads(),
        "aligndet": {name: align_ids(name) for name in ["deformable_detr", "co_deformable_detr", *STANDALONE]},
    }


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("kind", STANDALONE)
def test_standalone_detectors_assign_the_same_priors_and_rois_to_the_same_boxes(kind, expected):
    with torch.no_grad():
        assert standalone(kind) == expected["standalone"][kind]


def test_co_detr_auxiliary_heads_give_the_same_positives_for_the_same_boxes(expected):
    got = aux_heads()
    assert list(got) == list(expected["aux_heads"])
    for name, want in expected["aux_heads"].items():
        assert got[name]["per_box"] == want["per_box"], name
        for boxes, want_boxes in zip(got[name]["boxes"], want["boxes"]):
            assert boxes == pytest.approx(want_boxes, abs=0.01), name


@pytest.mark.parametrize("model_name", ["deformable_detr", "co_deformable_detr", *STANDALONE])
def test_aligndet_branches_label_the_same_rows_with_the_same_proposal_ids(model_name, expected):
    assert align_ids(model_name) == expected["aligndet"][model_name]
