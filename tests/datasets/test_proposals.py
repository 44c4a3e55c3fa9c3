"""Selective-search proposals: the filter rules, the search itself, and the JSON cache."""

import json
import os

import numpy as np
import pytest

from stages.data import proposals as proposals_module
from stages.data.proposals import filter_proposals, load_or_compute_proposals, selective_search
from stages.errors import UserError

IMAGE_SIZE = (100, 200)  # (h, w)


def _filter(boxes, **overrides):
    args = {
        "image_size": IMAGE_SIZE,
        "min_size": 10,
        "max_aspect_ratio": 3,
        "max_area_ratio": 0.8,
        "max_per_image": None,
        "nms_iou": None,
    }
    args.update(overrides)
    return filter_proposals(np.array(boxes, dtype=np.float64), **args)


def test_filter_drops_boxes_with_a_side_below_min_size():
    boxes = [[0, 0, 10, 10], [0, 0, 9.5, 20], [0, 0, 20, 9.5], [5, 5, 25, 25]]
    kept = _filter(boxes)
    np.testing.assert_array_equal(kept, [[0, 0, 10, 10], [5, 5, 25, 25]])


def test_filter_bounds_the_aspect_ratio_both_ways():
    wide_ok, wide_bad = [0, 0, 60, 20], [0, 0, 61, 20]  # w/h 3 and 3.05
    tall_ok, tall_bad = [0, 0, 20, 60], [0, 0, 20, 61]  # w/h 1/3 and 1/3.05
    kept = _filter([wide_ok, wide_bad, tall_ok, tall_bad])
    np.testing.assert_array_equal(kept, [wide_ok, tall_ok])


def test_filter_drops_boxes_above_the_area_ratio():
    # Image area 20000; sqrt(area / 20000) <= 0.5 means area <= 5000.
    small, limit, large = [0, 0, 50, 50], [0, 0, 100, 50], [0, 0, 100, 51]
    kept = _filter([small, limit, large], max_area_ratio=0.5)
    np.testing.assert_array_equal(kept, [small, limit])


def test_filter_keeps_the_first_n_in_the_given_order():
    boxes = [[i, 0, i + 20, 20] for i in (50, 10, 30, 0, 70)]
    kept = _filter(boxes, max_per_image=3)
    np.testing.assert_array_equal(kept, boxes[:3])


def test_filter_nms_drops_later_near_duplicates_and_keeps_the_order():
    boxes = [[50, 10, 90, 50], [0, 0, 30, 30], [51, 10, 90, 50], [1, 1, 30, 30], [100, 0, 140, 40]]
    kept = _filter(boxes, nms_iou=0.5)
    np.testing.assert_array_equal(kept, [boxes[0], boxes[1], boxes[4]])
    assert len(_filter(boxes, nms_iou=None)) == 5


def _two_rectangles(height=120, width=160):
    rng = np.random.default_rng(0)
    image = (rng.random((height, width, 3)) * 30).astype(np.uint8)
    image[10:60, 20:80] = (250, 250, 250)
    image[70:110, 90:150] = (220, 40, 40)
    return image, np.array([[20, 10, 80, 60], [90, 70, 150, 110]], dtype=np.float64)


def _best_iou(boxes, box):
    x1 = np.maximum(boxes[:, 0], box[0])
    y1 = np.maximum(boxes[:, 1], box[1])
    x2 = np.minimum(boxes[:, 2], box[2])
    y2 = np.minimum(boxes[:, 3], box[3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    union = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) + (box[2] - box[0]) * (box[3] - box[1])
    return float((inter / (union - inter)).max())


@pytest.mark.parametrize("mode", ["single", "fast"])
def test_selective_search_boxes_lie_inside_the_image_and_find_the_rectangles(mode):
    image, rectangles = _two_rectangles()
    # max_side below the image size: the search runs on a smaller copy and boxes are mapped back.
    boxes = selective_search(image, mode, scale=300, inc_k=150, sigma=0.9, max_side=100, seed=0)
    assert boxes.shape[1] == 4 and len(boxes) > 0
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= 160).all() and (boxes[:, 3] <= 120).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    for rectangle in rectangles:
        assert _best_iou(boxes, rectangle) > 0.8


def test_selective_search_order_is_reproducible_within_a_process():
    image, _ = _two_rectangles()
    runs = [selective_search(image, "fast", scale=100, inc_k=100, sigma=0.8, max_side=None, seed=3) for _ in range(3)]
    np.testing.assert_array_equal(runs[0], runs[1])
    np.testing.assert_array_equal(runs[0], runs[2])


class RectangleDataset:
    """Images with one bright rectangle each (or none), and an annotation file as `source`."""

    def __init__(self, source, rectangles, image_ids=None, size=(96, 128)):
        self.source = str(source)
        self.rectangles = rectangles
        self.image_ids = list(image_ids if image_ids is not None else range(100, 100 + len(rectangles)))
        self.size = size

    def __len__(self):
        return len(self.rectangles)

    def load_image(self, index):
        image = np.full((*self.size, 3), 20, dtype=np.uint8)
        rectangle = self.rectangles[index]
        if rectangle is not None:
            x1, y1, x2, y2 = rectangle
            image[y1:y2, x1:x2] = (240, 200, 40)
        return image


PARAMS = {
    "mode": "single",
    "scale": 300,
    "inc_k": 150,
    "sigma": 0.9,
    "max_side": None,
    "seed": 0,
    "min_size": 8,
    "max_aspect_ratio": 3,
    "max_area_ratio": 0.8,
    "nms_iou": 0.5,
    "max_per_image": 20,
    "start_method": "fork",
}


@pytest.fixture
def dataset(tmp_path):
    source = tmp_path / "train.json"
    source.write_text("{}")
    return RectangleDataset(source, [(10, 10, 50, 40), (60, 30, 110, 80), (20, 50, 70, 90)])


@pytest.fixture
def count_calls(monkeypatch):
    """Counts proposal computations per image in this process (num_workers=0)."""
    calls = []
    original = proposals_module.proposals_for_image

    def counting(image, params):
        calls.append(1)
        return original(image, params)

    monkeypatch.setattr(proposals_module, "proposals_for_image", counting)
    return calls


def _assert_same(first, second):
    assert first.keys() == second.keys()
    for image_id in first:
        np.testing.assert_array_equal(first[image_id], second[image_id])


def test_second_call_reads_the_cache_without_recomputing(dataset, tmp_path, count_calls):
    first, stats1 = load_or_compute_proposals(dataset, PARAMS, tmp_path / "cache", num_workers=0)
    assert len(count_calls) == 3 and not stats1.cache_hit
    second, stats2 = load_or_compute_proposals(dataset, PARAMS, tmp_path / "cache", num_workers=0)
    assert len(count_calls) == 3 and stats2.cache_hit
    _assert_same(first, second)
    assert set(first) == set(dataset.image_ids)
    assert all(boxes.dtype == np.float32 and boxes.shape[1] == 4 for boxes in first.values())
    stored = json.loads(open(stats1.cache_path).read())
    assert stored["params"]["min_size"] == 8 and stored["image_ids"] == dataset.image_ids
    assert os.path.basename(stats1.cache_path) == f"proposals-{stored['key'][:16]}.json"


def test_changing_a_parameter_rebuilds_the_cache(dataset, tmp_path, count_calls):
    _, stats1 = load_or_compute_proposals(dataset, PARAMS, tmp_path, num_workers=0)
    _, stats2 = load_or_compute_proposals(dataset, {**PARAMS, "max_per_image": 5}, tmp_path, num_workers=0)
    assert len(count_calls) == 6 and not stats2.cache_hit
    assert stats1.cache_path != stats2.cache_path
    # Settings outside the key (workers, start method) reuse the cache.
    _, stats3 = load_or_compute_proposals(dataset, {**PARAMS, "start_method": "spawn"}, tmp_path, num_workers=0)
    assert stats3.cache_hit and len(count_calls) == 6


def test_changing_the_annotation_file_or_image_ids_rebuilds_the_cache(dataset, tmp_path, count_calls):
    load_or_compute_proposals(dataset, PARAMS, tmp_path, num_workers=0)
    with open(dataset.source, "a") as f:
        f.write("\n")  # size changes
    _, stats = load_or_compute_proposals(dataset, PARAMS, tmp_path, num_workers=0)
    assert not stats.cache_hit and len(count_calls) == 6
    dataset.image_ids = [7, 8, 9]
    _, stats = load_or_compute_proposals(dataset, PARAMS, tmp_path, num_workers=0)
    assert not stats.cache_hit and len(count_calls) == 9


@pytest.mark.parametrize("field", ["key", "image_ids"])
def test_a_tampered_cache_file_is_rebuilt(dataset, tmp_path, count_calls, field):
    first, stats = load_or_compute_proposals(dataset, PARAMS, tmp_path, num_workers=0)
    payload = json.loads(open(stats.cache_path).read())
    payload[field] = "0" * 64 if field == "key" else [1, 2, 3]
    payload["boxes"] = [[] for _ in payload["boxes"]]
    with open(stats.cache_path, "w") as f:
        json.dump(payload, f)
    again, stats = load_or_compute_proposals(dataset, PARAMS, tmp_path, num_workers=0)
    assert not stats.cache_hit and len(count_calls) == 6
    _assert_same(first, again)
    repaired = json.loads(open(stats.cache_path).read())
    assert repaired["image_ids"] == dataset.image_ids and repaired["key"] != "0" * 64


def test_a_truncated_cache_file_is_rebuilt(dataset, tmp_path, count_calls):
    _, stats = load_or_compute_proposals(dataset, PARAMS, tmp_path, num_workers=0)
    with open(stats.cache_path, "w") as f:
        f.write('{"key": "abc", "boxes": [[')
    _, stats = load_or_compute_proposals(dataset, PARAMS, tmp_path, num_workers=0)
    assert not stats.cache_hit and len(count_calls) == 6


def test_worker_processes_give_the_same_proposals_as_in_process(dataset, tmp_path):
    # Start OpenCV's thread pool in this process first: forked workers used to hang on it.
    selective_search(_two_rectangles()[0], "fast", scale=100, inc_k=100, sigma=0.8, max_side=None, seed=0)
    in_process, _ = load_or_compute_proposals(dataset, PARAMS, tmp_path / "a", num_workers=0)
    in_workers, stats = load_or_compute_proposals(dataset, PARAMS, tmp_path / "b", num_workers=2)
    assert not stats.cache_hit
    _assert_same(in_process, in_workers)


def test_images_without_a_usable_proposal_are_skipped_and_counted(tmp_path, caplog):
    # A blank image yields only the whole-image region, which the area-ratio rule removes.
    dataset = RectangleDataset(tmp_path / "none.json", [(10, 10, 50, 40), None, (20, 50, 70, 90)])
    with caplog.at_level("INFO", logger="stages.data.proposals"):
        result, stats = load_or_compute_proposals(dataset, PARAMS, tmp_path, num_workers=0)
    assert set(result) == {100, 102}
    assert stats.num_skipped == 1 and stats.num_images == 3
    assert "1 of 3 images had no usable proposal and are skipped" in caplog.text


def test_no_proposal_in_any_image_is_a_user_error(tmp_path):
    dataset = RectangleDataset(tmp_path / "blank.json", [None, None])
    with pytest.raises(UserError, match="blank.json"):
        load_or_compute_proposals(dataset, PARAMS, tmp_path, num_workers=0)


def test_a_bad_parameter_is_a_user_error(dataset, tmp_path):
    with pytest.raises(UserError, match="stage.proposals.mode"):
        load_or_compute_proposals(dataset, {**PARAMS, "mode": "slow"}, tmp_path, num_workers=0)
    missing = {k: v for k, v in PARAMS.items() if k != "nms_iou"}
    with pytest.raises(UserError, match="nms_iou"):
        load_or_compute_proposals(dataset, missing, tmp_path, num_workers=0)
