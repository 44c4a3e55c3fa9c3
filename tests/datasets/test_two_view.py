"""Two views of an image: proposals follow each view's own resize, flip and crop, and keep their ids."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from models.pretrain.aligndet import batch_unique_ids
from stages.data.transforms import Compose, PhotometricJitter, RandomHorizontalFlip, RandomResize
from stages.data.two_view import TwoViewDataset, build_two_view_dataset, collate_two_view
from stages.errors import UserError

HEIGHT, WIDTH = 90, 160
# Distinct colours, placed asymmetrically so a flip moves every box; gaps keep colours apart after resizing.
RECTANGLES = {
    (1.0, 0.0, 0.0): (10, 10, 50, 40),
    (0.0, 1.0, 0.0): (70, 20, 100, 80),
    (0.0, 0.0, 1.0): (115, 50, 155, 85),
}
COLOURS = list(RECTANGLES)
# The proposals, in an order unrelated to the colours' order: proposal k is RECTANGLES[COLOURS[ORDER[k]]].
ORDER = [2, 0, 1]


class ColouredRectangles:
    """Images 0..n-1 show the same rectangles; ids 10, 11, ..."""

    source = "rectangles.json"

    def __init__(self, count=2):
        self.image_ids = [10 + i for i in range(count)]

    def __len__(self):
        return len(self.image_ids)

    def load_image(self, index):
        image = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
        for colour, (x1, y1, x2, y2) in RECTANGLES.items():
            image[y1:y2, x1:x2] = np.array(colour) * 255
        return image


def _proposals(dataset):
    boxes = np.array([RECTANGLES[COLOURS[k]] for k in ORDER], dtype=np.float32)
    return {image_id: boxes for image_id in dataset.image_ids}


def _views(flip_prob=0.5, jitter=False):
    def one():
        steps = [RandomResize([60, 90, 135], 400), RandomHorizontalFlip(flip_prob)]
        if jitter:
            steps.append(PhotometricJitter(0.3, 0.3, 0.3, 0.0))
        return Compose(steps)

    return one(), one()


def _colour_box(image, colour):
    """Bounding box (xyxy, pixel edges) of the pixels close to `colour` in a CHW image, or None."""
    distance = (image - torch.tensor(colour)[:, None, None]).abs().amax(0)
    ys, xs = torch.nonzero(distance < 0.3, as_tuple=True)
    if len(xs) == 0:
        return None
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def _assert_boxes_bound_their_colours(image, target, tolerance=1.5):
    for box, proposal_id in zip(target["boxes"], target["ids"].tolist(), strict=True):
        colour = COLOURS[ORDER[proposal_id]]
        found = _colour_box(image, colour)
        assert found is not None, f"proposal {proposal_id} has no pixels of its colour in the view"
        assert torch.allclose(box, found, atol=tolerance), (proposal_id, box, found)


def test_views_share_ids_and_each_view_boxes_follow_its_own_resize_and_flip():
    dataset = ColouredRectangles()
    two_views = TwoViewDataset(dataset, _proposals(dataset), *_views())
    flipped, sizes_differ = set(), False
    for seed in range(12):
        torch.manual_seed(seed)
        image1, target1, image2, target2 = two_views[seed % len(two_views)]
        for image, target in ((image1, target1), (image2, target2)):
            assert target["ids"].tolist() == [0, 1, 2]
            assert target["size"].tolist() == list(image.shape[-2:])
            assert target["orig_size"].tolist() == [HEIGHT, WIDTH]
            assert target["image_id"] == dataset.image_ids[seed % len(two_views)]
            _assert_boxes_bound_their_colours(image, target)
            # The red rectangle sits on the left of the file; on the right means this view was flipped.
            red = target["boxes"][ORDER.index(0)]
            flipped.add(bool(red[0] > image.shape[-1] / 2))
        sizes_differ |= target1["size"].tolist() != target2["size"].tolist()
    assert flipped == {True, False} and sizes_differ


def test_photometric_jitter_leaves_the_boxes_on_their_regions():
    dataset = ColouredRectangles(count=1)
    two_views = TwoViewDataset(dataset, _proposals(dataset), *_views(jitter=True))
    torch.manual_seed(0)
    image1, target1, image2, target2 = two_views[0]
    for image, target in ((image1, target1), (image2, target2)):
        # Jitter changes colours, so check the boxes against the non-black pixels of each rectangle's box.
        bright = image.amax(0) > 0.05
        for box in target["boxes"].round().long():
            x1, y1, x2, y2 = box.tolist()
            assert bright[y1 + 1 : y2 - 1, x1 + 1 : x2 - 1].float().mean() > 0.95


def test_crop_keeps_mostly_visible_proposals_with_their_ids():
    dataset = ColouredRectangles(count=1)
    crop = {"enabled": True, "min_scale": 0.4, "max_scale": 0.7, "min_visible": 0.5, "max_tries": 10}
    two_views = TwoViewDataset(dataset, _proposals(dataset), *_views(), crop_cfg=crop)
    id_sets_differ = False
    for seed in range(20):
        torch.manual_seed(seed)
        image1, target1, image2, target2 = two_views[0]
        ids1, ids2 = set(target1["ids"].tolist()), set(target2["ids"].tolist())
        assert ids1 and ids2 and ids1 & ids2  # each view keeps one, and they share one
        assert ids1 <= {0, 1, 2} and ids2 <= {0, 1, 2}
        for image, target in ((image1, target1), (image2, target2)):
            assert len(target["boxes"]) == len(target["ids"]) == len(target["labels"])
            assert (target["boxes"][:, 2:] <= target["size"].flip(0)).all()
            # A kept box is the visible part of its rectangle, so it still bounds that colour's pixels.
            _assert_boxes_bound_their_colours(image, target, tolerance=2.0)
        id_sets_differ |= ids1 != ids2
    assert id_sets_differ


def test_crop_drops_proposals_below_min_visible():
    dataset = ColouredRectangles(count=1)
    crop = {"enabled": True, "min_scale": 0.5, "max_scale": 0.5, "min_visible": 0.9, "max_tries": 1}
    two_views = TwoViewDataset(dataset, _proposals(dataset), *_views(), crop_cfg=crop)
    image, target = two_views._base(0)
    for seed in range(20):
        torch.manual_seed(seed)
        window = two_views.crop.sample_window(HEIGHT, WIDTH)
        cropped, cropped_target = two_views.crop.apply(image, target, window)
        x0, y0, x1, y1 = window
        for proposal_id in range(3):
            rx1, ry1, rx2, ry2 = RECTANGLES[COLOURS[ORDER[proposal_id]]]
            visible = max(0, min(rx2, x1) - max(rx1, x0)) * max(0, min(ry2, y1) - max(ry1, y0))
            kept = proposal_id in cropped_target["ids"].tolist()
            assert kept == (visible >= 0.9 * (rx2 - rx1) * (ry2 - ry1))
        assert list(cropped.shape[-2:]) == [y1 - y0, x1 - x0]


def test_images_without_proposals_are_skipped():
    dataset = ColouredRectangles(count=3)
    proposals = _proposals(dataset)
    proposals[10] = np.zeros((0, 4), dtype=np.float32)
    del proposals[12]
    two_views = TwoViewDataset(dataset, proposals, *_views())
    assert len(two_views) == 1
    assert two_views[0][1]["image_id"] == 11
    with pytest.raises(UserError, match="rectangles.json"):
        TwoViewDataset(dataset, {}, *_views())


def test_collate_and_loader_give_four_lists():
    dataset = ColouredRectangles(count=3)
    two_views = TwoViewDataset(dataset, _proposals(dataset), *_views())
    loader = DataLoader(two_views, batch_size=2, collate_fn=collate_two_view)
    images1, targets1, images2, targets2 = next(iter(loader))
    assert len(images1) == len(targets1) == len(images2) == len(targets2) == 2
    assert [t["image_id"] for t in targets1] == [t["image_id"] for t in targets2] == [10, 11]
    assert all(image.dim() == 3 and image.shape[0] == 3 for image in images1 + images2)


def test_batch_unique_ids_are_unique_across_images_and_equal_across_views():
    ids = [
        (torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2])),
        (torch.tensor([0, 3]), torch.tensor([1, 3, 4])),  # a crop left different ids in each view
        (torch.tensor([0]), torch.tensor([0])),
    ]
    targets1 = [{"ids": a} for a, _ in ids]
    targets2 = [{"ids": b} for _, b in ids]
    ids1, ids2 = batch_unique_ids(targets1, targets2)
    assert [t.tolist() for t in ids1] == [[0, 1, 2], [3, 6], [8]]
    assert [t.tolist() for t in ids2] == [[0, 1, 2], [4, 6, 7], [8]]
    all_ids1, all_ids2 = torch.cat(ids1), torch.cat(ids2)
    assert len(set(all_ids1.tolist())) == len(all_ids1) and len(set(all_ids2.tolist())) == len(all_ids2)
    # The same region gets the same batch id in both views, and different images never share one.
    for image, (a, b) in enumerate(ids):
        for local in set(a.tolist()) & set(b.tolist()):
            assert ids1[image][a.tolist().index(local)] == ids2[image][b.tolist().index(local)]
    per_image = [set(i.tolist()) | set(j.tolist()) for i, j in zip(ids1, ids2, strict=True)]
    assert not (per_image[0] & per_image[1]) and not (per_image[1] & per_image[2])


def test_build_two_view_dataset_from_the_stage_config():
    views_cfg = OmegaConf.create(
        {
            "min_sizes": [60, 90],
            "max_size": 200,
            "flip_prob": 0.5,
            "brightness": 0.4,
            "contrast": 0.4,
            "saturation": 0.4,
            "hue": 0.1,
            "crop": {"enabled": False, "min_scale": 0.5, "max_scale": 1.0, "min_visible": 0.5, "max_tries": 10},
        }
    )
    dataset = ColouredRectangles(count=1)
    two_views = build_two_view_dataset(dataset, _proposals(dataset), views_cfg)
    assert two_views.crop is None
    assert two_views.view_transforms[0] is not two_views.view_transforms[1]
    torch.manual_seed(0)
    image1, target1, _, target2 = two_views[0]
    assert min(image1.shape[-2:]) in (60, 90) and target1["ids"].tolist() == target2["ids"].tolist() == [0, 1, 2]
    with pytest.raises(UserError, match="stage.views.max_size"):
        build_two_view_dataset(dataset, _proposals(dataset), OmegaConf.merge(views_cfg, {"max_size": 50}))
