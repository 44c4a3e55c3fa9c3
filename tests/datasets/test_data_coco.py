import json
import logging

import cv2
import numpy as np
import pytest
import torch
from pycocotools.cocoeval import COCOeval

from stages.data.coco import CocoDetection
from stages.data.transforms import RandomHorizontalFlip
from stages.errors import UserError


def hand_written_coco() -> dict:
    """What real COCO files hold: sparse unordered category ids, float boxes, a crowd, an image without
    annotations, a grayscale non-square image in a sub-folder."""
    return {
        "images": [
            {"id": 42, "file_name": "colour.png", "height": 40, "width": 60},
            {"id": 7, "file_name": "nested/gray.png", "height": 30, "width": 50},
            {"id": 19, "file_name": "empty.png", "height": 20, "width": 20},
        ],
        "categories": [
            {"id": 90, "name": "zebra"},
            {"id": 3, "name": "cat"},
            {"id": 17, "name": "dog"},
        ],
        "annotations": [
            {"id": 1, "image_id": 42, "category_id": 17, "bbox": [10.5, 5.25, 20.0, 10.5], "area": 210.0, "iscrowd": 0},
            {"id": 2, "image_id": 42, "category_id": 90, "bbox": [45.0, 30.0, 15.0, 10.0], "area": 150.0, "iscrowd": 0},
            {"id": 3, "image_id": 42, "category_id": 3, "bbox": [0.0, 0.0, 30.0, 30.0], "area": 900.0, "iscrowd": 1},
            {"id": 4, "image_id": 7, "category_id": 3, "bbox": [1.0, 2.0, 3.0, 4.0]},
        ],
    }


def write_images(image_dir, dataset):
    rng = np.random.default_rng(0)
    for info in dataset["images"]:
        path = image_dir / info["file_name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        shape = (info["height"], info["width"]) + (() if "gray" in info["file_name"] else (3,))
        cv2.imwrite(str(path), rng.integers(0, 256, shape, dtype=np.uint8))


@pytest.fixture
def coco_files(tmp_path):
    """(image_dir, json path, dataset dict) of the hand-written dataset with its images on disk."""
    dataset = hand_written_coco()
    image_dir = tmp_path / "images"
    write_images(image_dir, dataset)
    ann_file = tmp_path / "annotations" / "train.json"
    ann_file.parent.mkdir()
    ann_file.write_text(json.dumps(dataset))
    return image_dir, ann_file, dataset


def write_json(tmp_path, dataset) -> str:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(dataset))
    return str(path)


def test_sparse_unordered_category_ids_map_to_contiguous_labels_and_back(coco_files):
    image_dir, ann_file, _ = coco_files
    dataset = CocoDetection(image_dir, ann_file)
    assert dataset.num_classes == 3
    assert dataset.label_to_cat_id == [3, 17, 90]
    assert dataset.class_names == ["cat", "dog", "zebra"]
    assert dataset.image_ids == [7, 19, 42]
    assert dataset.source == str(ann_file)


def test_item_has_xyxy_float_boxes_without_crowds(coco_files):
    image_dir, ann_file, _ = coco_files
    dataset = CocoDetection(image_dir, ann_file)
    image, target = dataset[dataset.image_ids.index(42)]
    assert image.dtype == torch.float32 and image.shape == (3, 40, 60)
    assert 0 <= image.min() and image.max() <= 1
    assert target["boxes"].tolist() == [[10.5, 5.25, 30.5, 15.75], [45.0, 30.0, 60.0, 40.0]]
    assert target["labels"].tolist() == [1, 2]  # dog, zebra; the crowd cat is left out
    assert target["image_id"] == 42
    assert target["orig_size"].tolist() == [40, 60] and target["size"].tolist() == [40, 60]


def test_boxes_past_the_image_edge_are_clipped_in_targets(coco_files, tmp_path):
    image_dir, _, dataset = coco_files
    dataset["annotations"][1]["bbox"] = [50.0, -5.0, 20.0, 20.0]
    loaded = CocoDetection(image_dir, write_json(tmp_path, dataset))
    assert loaded.raw_target(loaded.image_ids.index(42))["boxes"][1].tolist() == [50.0, 0.0, 60.0, 15.0]


def test_grayscale_non_square_image_in_a_sub_folder_loads_as_rgb(coco_files):
    image_dir, ann_file, _ = coco_files
    dataset = CocoDetection(image_dir, ann_file)
    index = dataset.image_ids.index(7)
    pixels = dataset.load_image(index)
    assert pixels.shape == (30, 50, 3) and pixels.dtype == np.uint8
    assert np.array_equal(pixels[..., 0], pixels[..., 1])
    image, target = dataset[index]
    assert image.shape == (3, 30, 50)
    assert target["boxes"].tolist() == [[1.0, 2.0, 4.0, 6.0]] and target["labels"].tolist() == [0]


def test_image_without_annotations_is_kept_with_an_empty_target(coco_files):
    image_dir, ann_file, _ = coco_files
    dataset = CocoDetection(image_dir, ann_file)
    image, target = dataset[dataset.image_ids.index(19)]
    assert image.shape == (3, 20, 20)
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["labels"].dtype == torch.int64


def test_ground_truth_keeps_crowds_and_fills_missing_area_for_cocoeval(coco_files):
    image_dir, ann_file, _ = coco_files
    dataset = CocoDetection(image_dir, ann_file)
    assert dataset.coco.anns[3]["iscrowd"] == 1
    assert dataset.coco.anns[4]["area"] == 12.0 and dataset.coco.anns[4]["iscrowd"] == 0


def test_perfect_predictions_mapped_back_to_category_ids_score_ap_one(coco_files):
    image_dir, ann_file, _ = coco_files
    dataset = CocoDetection(image_dir, ann_file)
    results = []
    for index, image_id in enumerate(dataset.image_ids):
        target = dataset.raw_target(index)
        for box, label in zip(target["boxes"].tolist(), target["labels"].tolist(), strict=True):
            x1, y1, x2, y2 = box
            category_id = dataset.label_to_cat_id[label]
            results.append(
                {"image_id": image_id, "category_id": category_id, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": 1.0}
            )
    evaluator = COCOeval(dataset.coco, dataset.coco.loadRes(results), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.stats[1] == pytest.approx(1.0)  # AP50


def test_subset_restricts_items_and_ground_truth(coco_files):
    image_dir, ann_file, _ = coco_files
    dataset = CocoDetection(image_dir, ann_file, image_ids=[42, 19])
    assert len(dataset) == 2 and dataset.image_ids == [42, 19]
    assert sorted(dataset.coco.getImgIds()) == [19, 42]
    assert sorted(dataset.coco.getAnnIds()) == [1, 2, 3]
    smaller = dataset.subset([19])
    assert smaller.image_ids == [19] and dataset.image_ids == [42, 19]


def test_transforms_are_applied_to_items(coco_files):
    image_dir, ann_file, _ = coco_files
    dataset = CocoDetection(image_dir, ann_file, transforms=RandomHorizontalFlip(p=1.0))
    plain = CocoDetection(image_dir, ann_file)
    index = dataset.image_ids.index(7)
    image, target = dataset[index]
    assert torch.equal(image, plain[index][0].flip(-1))
    assert target["boxes"].tolist() == [[46.0, 2.0, 49.0, 6.0]]


def test_truncated_json_is_a_user_error_with_file_and_position(coco_files, tmp_path):
    _, ann_file, _ = coco_files
    text = ann_file.read_text()
    truncated = tmp_path / "truncated.json"
    truncated.write_text(text[: len(text) // 2])
    with pytest.raises(UserError, match=r"truncated\.json: not valid JSON \(line 1 column \d+: .+\)$"):
        CocoDetection(tmp_path, truncated)


def test_missing_json_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"nothere\.json: file not found"):
        CocoDetection(tmp_path, tmp_path / "nothere.json")


def test_missing_top_level_key_is_a_user_error(tmp_path):
    dataset = hand_written_coco()
    del dataset["categories"]
    with pytest.raises(UserError, match=r"bad\.json: missing top-level key 'categories'"):
        CocoDetection(tmp_path, write_json(tmp_path, dataset))


def test_unknown_category_id_is_a_user_error_naming_the_annotation(tmp_path):
    dataset = hand_written_coco()
    dataset["annotations"][1]["category_id"] = 5
    with pytest.raises(UserError, match=r"bad\.json: annotation 2 has category_id 5, which is not in 'categories'"):
        CocoDetection(tmp_path, write_json(tmp_path, dataset))


def test_unknown_image_id_is_a_user_error_naming_the_annotation(tmp_path):
    dataset = hand_written_coco()
    dataset["annotations"][3]["image_id"] = 8
    with pytest.raises(UserError, match=r"bad\.json: annotation 4 has image_id 8, which is not in 'images'"):
        CocoDetection(tmp_path, write_json(tmp_path, dataset))


@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("image_id", 7.0, "an integer"),
        ("image_id", "7", "an integer"),
        ("category_id", True, "an integer"),
        ("iscrowd", "no", "a number"),
        ("area", None, "a number"),
    ],
)
def test_wrongly_typed_ids_and_numbers_are_user_errors_naming_the_annotation(tmp_path, field, value, expected):
    dataset = hand_written_coco()
    dataset["annotations"][1][field] = value
    with pytest.raises(UserError, match=rf"bad\.json: annotation 2 has {field} .*; expected {expected}$"):
        CocoDetection(tmp_path, write_json(tmp_path, dataset))


@pytest.mark.parametrize("index,side", [(2, "width"), (3, "height")])
def test_negative_box_size_is_a_user_error_naming_the_annotation(tmp_path, index, side):
    dataset = hand_written_coco()
    dataset["annotations"][0]["bbox"][index] = -3
    with pytest.raises(UserError, match=rf"bad\.json: annotation 1 has bbox {side} -3\.0; expected >= 0$"):
        CocoDetection(tmp_path, write_json(tmp_path, dataset))


def test_zero_size_box_is_left_out_of_training_with_a_warning(coco_files, tmp_path, caplog):
    # COCO train2017 holds two such boxes (annotations 918 and 2206849), so they cannot be an error.
    image_dir, _, dataset = coco_files
    dataset["annotations"][0]["bbox"][2] = 0.0
    with caplog.at_level(logging.WARNING):
        loaded = CocoDetection(image_dir, write_json(tmp_path, dataset))
    assert "zero-size box" in caplog.text and "annotation 1" in caplog.text
    target = loaded.raw_target(loaded.image_ids.index(42))
    assert target["labels"].tolist() == [2]


def test_malformed_bbox_is_a_user_error(tmp_path):
    dataset = hand_written_coco()
    dataset["annotations"][0]["bbox"] = [1, 2, 3]
    with pytest.raises(UserError, match=r"bad\.json: annotation 1 has bbox \[1, 2, 3\]; expected \[x, y, width"):
        CocoDetection(tmp_path, write_json(tmp_path, dataset))


def test_missing_image_file_is_a_user_error_on_load_naming_json_id_and_path(coco_files):
    image_dir, ann_file, _ = coco_files
    (image_dir / "nested" / "gray.png").unlink()
    dataset = CocoDetection(image_dir, ann_file)  # construction does not touch images
    with pytest.raises(UserError, match=r"train\.json: image 7 file .*nested/gray\.png does not exist$"):
        dataset[dataset.image_ids.index(7)]


def test_image_of_another_size_than_the_json_says_is_a_user_error(coco_files):
    image_dir, ann_file, _ = coco_files
    cv2.imwrite(str(image_dir / "empty.png"), np.zeros((21, 20, 3), np.uint8))
    dataset = CocoDetection(image_dir, ann_file)
    with pytest.raises(UserError, match=r"image 19 file .*empty\.png is 21x20 \(h x w\); expected 20x20"):
        dataset.load_image(dataset.image_ids.index(19))
