"""The two COCO evaluation backends (pycocotools, faster-coco-eval) give the same AP, crowds and empty images
included, and an unknown backend is refused in one line."""

from __future__ import annotations

import pytest

from stages.data.coco import make_coco
from stages.data.random_coco import crowded_coco
from stages.engine.coco_eval import METRIC_NAMES, evaluate_coco
from stages.errors import UserError


@pytest.mark.parametrize("seed", [0, 1])
def test_both_backends_give_the_same_ap_with_crowds_and_empty_images(seed):
    dataset, results = crowded_coco(seed)
    gt = make_coco(dataset)
    image_ids = [i["id"] for i in dataset["images"]]
    names, cat_ids = ["a", "b", "c"], [3, 7, 11]
    reference = evaluate_coco(gt, results, image_ids, names, cat_ids, "pycocotools")
    faster = evaluate_coco(make_coco(dataset), results, image_ids, names, cat_ids, "faster_coco_eval")
    assert 0 < reference["AP"] < 100
    for key in METRIC_NAMES:
        assert round(faster[key], 2) == round(reference[key], 2), key
    for name in names:
        assert round(faster["per_class"][name], 2) == round(reference["per_class"][name], 2), name


def test_an_unknown_backend_is_a_user_error():
    dataset, results = crowded_coco(0, num_images=3)
    with pytest.raises(UserError, match=r"^stage.backend: unknown COCO evaluation backend 'fast'"):
        evaluate_coco(make_coco(dataset), results, [1, 2, 3], ["a", "b", "c"], [3, 7, 11], "fast")
