"""The Co-DETR auxiliary heads, each alone on fixed random maps: learning, positives, empty images, gradients."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torchvision.ops import box_iou

from models.heads import AuxHead
from models.matching.assigners import BACKGROUND, ATSSAssigner, FCOSAssigner, MaxIoUAssigner
from models.matching.priors import valid_location_mask
from tests.helpers import CONF_DIR

CONFIG = CONF_DIR / "model" / "aux_heads.yaml"
STRIDES = [8, 16, 32, 64, 128]
CHANNELS = 16
NUM_CLASSES = 3
HEAD_NAMES = ["atss", "faster_rcnn", "retinanet", "fcos"]
# Only sizes shrink for a 2-core CPU; every assignment and loss setting is the YAML's.
SMALL = {
    "num_groups": 4,
    "representation_size": 64,
    "rpn_batch_size_per_image": 64,
    "rcnn_batch_size_per_image": 64,
    "rpn_pre_nms_top_n": 200,
    "rpn_post_nms_top_n": 50,
    "max_negatives": 20,
}


pytestmark = pytest.mark.usefixtures("one_thread")


def build_head(name: str) -> AuxHead:
    entry = OmegaConf.to_container(OmegaConf.load(CONFIG))["aux_head_configs"][name]
    kwargs = {k: SMALL.get(k, v) for k, v in entry.items()}
    return instantiate(kwargs, name=name, num_classes=NUM_CLASSES, in_channels=CHANNELS, strides=STRIDES)


def pyramid(image_size: tuple[int, int], batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    h, w = image_size
    return [torch.randn(batch, CHANNELS, -(-h // s), -(-w // s), generator=gen) for s in STRIDES]


def two_images() -> tuple[list[tuple[int, int]], list[dict[str, torch.Tensor]]]:
    targets = [
        {"boxes": torch.tensor([[8.0, 10, 40, 50], [30, 20, 60, 62]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.tensor([[5.0, 5, 30, 25]]), "labels": torch.tensor([0])},
    ]
    return [(64, 64), (56, 48)], targets


def no_boxes(count: int) -> list[dict[str, torch.Tensor]]:
    return [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)} for _ in range(count)]


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_head_overfits_two_images(name):
    torch.manual_seed(0)
    head = build_head(name)
    sizes, targets = two_images()
    features = pyramid((64, 64))
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
    history = []
    for _ in range(150):
        losses, _ = head(features, STRIDES, sizes, targets)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert sum(history[-10:]) / 10 < 0.5 * history[0]


def _direct_assignment(head, features, sizes, targets) -> list[torch.Tensor]:
    """Each image's matched [N] from a direct call of the head's assigner class on its valid priors."""
    shapes = [tuple(f.shape[-2:]) for f in features]
    priors = head.make_priors(shapes, torch.device("cpu"))
    valid = valid_location_mask(shapes, STRIDES, sizes, torch.device("cpu"))[:, priors.locations]
    out = []
    for image, target in enumerate(targets):
        index = valid[image].nonzero().squeeze(1)
        if isinstance(head.assigner, ATSSAssigner):
            per_level = torch.bincount(priors.levels[index], minlength=len(STRIDES)).tolist()
            sub = ATSSAssigner(head.assigner.topk).assign(priors.boxes[index], per_level, target["boxes"])
        elif isinstance(head.assigner, MaxIoUAssigner):
            sub = MaxIoUAssigner(0.5, 0.4, 0.0, "mmdet").assign(priors.boxes[index], target["boxes"])
        else:
            assert isinstance(head.assigner, FCOSAssigner)
            ranges = torch.tensor(head.regress_ranges)[priors.levels[index]]
            sub = FCOSAssigner(True, 1.5).assign(priors.centers[index], priors.strides[index], ranges, target["boxes"])
        matched = torch.full((priors.boxes.shape[0],), -2, dtype=torch.int64)
        matched[index] = sub
        out.append(matched)
    return out


@pytest.mark.parametrize("name", ["atss", "retinanet", "fcos"])
def test_dense_positives_are_what_the_assigner_returned(name):
    torch.manual_seed(0)
    head = build_head(name)
    sizes, targets = two_images()
    features = pyramid((64, 64))
    _, positives = head(features, STRIDES, sizes, targets)
    priors = head.make_priors([tuple(f.shape[-2:]) for f in features], torch.device("cpu"))
    cells = torch.cat([f.flatten(2) for f in features], dim=2).transpose(1, 2)
    for image, matched in enumerate(_direct_assignment(head, features, sizes, targets)):
        pos = (matched >= 0).nonzero().squeeze(1)
        assert len(pos) > 0
        assert torch.equal(positives.boxes[image], priors.boxes[pos])
        assert torch.equal(positives.gt_indices[image], matched[pos])
        assert torch.equal(positives.labels[image], targets[image]["labels"][matched[pos]])
        assert torch.equal(positives.target_boxes[image], targets[image]["boxes"][matched[pos]])
        assert torch.equal(positives.features[image], cells[image, priors.locations[pos]])
        background = {tuple(b) for b in priors.boxes[matched == BACKGROUND].tolist()}
        assert 0 < len(positives.negative_boxes[image]) <= SMALL["max_negatives"]
        assert all(tuple(b) in background for b in positives.negative_boxes[image].tolist())


def test_faster_rcnn_positives_are_sampled_proposals_with_their_boxes_and_roi_features():
    torch.manual_seed(0)
    head = build_head("faster_rcnn")
    sizes, targets = two_images()
    features = pyramid((64, 64))
    _, positives = head(features, STRIDES, sizes, targets)
    padded = (features[0].shape[-2] * STRIDES[0], features[0].shape[-1] * STRIDES[0])
    for image, target in enumerate(targets):
        boxes, gt_index = positives.boxes[image], positives.gt_indices[image]
        assert torch.equal(positives.target_boxes[image], target["boxes"][gt_index])
        assert torch.equal(positives.labels[image], target["labels"][gt_index])
        iou = box_iou(boxes, target["boxes"])[torch.arange(len(boxes)), gt_index]
        assert (iou >= 0.5).all()
        # Ground-truth boxes are appended to the proposals, so each is among its own positives.
        for box in target["boxes"]:
            assert (boxes == box).all(dim=1).any()
        maps = {str(i): features[i][image : image + 1] for i in range(head.num_roi_levels)}
        pooled = head.roi_pool(maps, [boxes], [padded]).mean(dim=(2, 3))
        torch.testing.assert_close(positives.features[image], pooled)
        assert positives.features[image].shape == (len(boxes), CHANNELS)
        assert (box_iou(positives.negative_boxes[image], target["boxes"]).amax(dim=1) < 0.5).all()


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_images_without_boxes_give_finite_connected_losses(name):
    torch.manual_seed(0)
    head = build_head(name)
    features = [f.requires_grad_() for f in pyramid((64, 64))]
    losses, positives = head(features, STRIDES, [(64, 64), (40, 64)], no_boxes(2))
    assert all(torch.isfinite(v) and v.requires_grad for v in losses.values())
    assert positives.num_positives() == [0, 0]
    assert all(len(n) > 0 for n in positives.negative_boxes)
    sum(losses.values()).backward()
    assert features[0].grad is not None


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    head = build_head(name)
    sizes, targets = two_images()
    targets[1] = no_boxes(1)[0]  # a box-free image in the batch must not break anything
    losses, _ = head(pyramid((64, 64)), STRIDES, sizes, targets)
    sum(losses.values()).backward()
    for param_name, param in head.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name
        if "level_scales" not in param_name:  # a level without positives leaves its scale's gradient at 0
            assert param.grad.abs().sum() > 0, param_name


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_losses_are_float32_under_autocast(name):
    torch.manual_seed(0)
    head = build_head(name)
    sizes, targets = two_images()
    features = [f.to(torch.bfloat16).requires_grad_() for f in pyramid((64, 64))]  # as adapter maps under AMP
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        losses, positives = head(features, STRIDES, sizes, targets)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert features[0].grad is not None and positives.features[0].dtype == torch.bfloat16


def test_strides_other_than_the_built_ones_are_refused():
    head = build_head("atss")
    sizes, targets = two_images()
    with pytest.raises(ValueError, match="strides"):
        head(pyramid((64, 64)), [4, 8, 16, 32, 64], sizes, targets)
