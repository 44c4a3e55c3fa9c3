import cv2
import numpy as np
import pytest
from omegaconf import OmegaConf

from stages.data.build import build_dataset
from stages.data.voc import VOCDetection
from stages.errors import UserError
from tests.helpers import CONF_DIR

CLASSES = ["person", "cat", "dog"]


def voc_xml(width, height, objects) -> str:
    parts = [f"<annotation><size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    for name, box, difficult in objects:
        xmin, ymin, xmax, ymax = box
        parts.append(
            f"<object><name>{name}</name><difficult>{int(difficult)}</difficult>"
            f"<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
        )
    return "".join(parts) + "</annotation>"


def add_image(root, year, name, width, height, objects, sets=("trainval",)):
    base = root / f"VOC{year}"
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(base / "JPEGImages" / f"{name}.jpg"), np.full((height, width, 3), 128, np.uint8))
    (base / "Annotations" / f"{name}.xml").write_text(voc_xml(width, height, objects))
    for image_set in sets:
        with open(base / "ImageSets" / "Main" / f"{image_set}.txt", "a") as handle:
            handle.write(f"{name}\n")


@pytest.fixture
def devkit(tmp_path):
    root = tmp_path / "VOCdevkit"
    add_image(root, 2007, "000005", 50, 40, [("cat", (11, 6, 30, 20), False), ("dog", (1, 1, 10, 10), True)])
    add_image(root, 2007, "000012", 30, 60, [("person", (5, 5, 25, 55), False)], sets=("test",))
    add_image(root, 2012, "2008_000008", 40, 40, [("dog", (2, 3, 20, 30), False)])
    return root


def test_voc_loads_with_difficult_objects_left_out_of_training(devkit):
    dataset = VOCDetection(devkit, [(2007, "trainval"), (2012, "trainval")], CLASSES)
    assert dataset.image_ids == [5, 2008000008]
    assert dataset.class_names == CLASSES and dataset.label_to_cat_id == [1, 2, 3]
    image, target = dataset[0]
    assert image.shape == (3, 40, 50)
    # VOC's 1-based inclusive corners become 0-based continuous pixels.
    assert target["boxes"].tolist() == [[10.0, 5.0, 30.0, 20.0]]
    assert target["labels"].tolist() == [1]


def test_voc_keep_difficult_puts_them_in_training_targets(devkit):
    dataset = VOCDetection(devkit, [(2007, "trainval")], CLASSES, keep_difficult=True)
    target = dataset.raw_target(0)
    assert target["labels"].tolist() == [1, 2]
    assert target["boxes"][1].tolist() == [0.0, 0.0, 10.0, 10.0]


@pytest.mark.parametrize("keep_difficult", [False, True])
def test_voc_ground_truth_marks_difficult_as_crowd_with_ids_in_class_order(devkit, keep_difficult):
    dataset = VOCDetection(devkit, [(2007, "trainval")], CLASSES, keep_difficult=keep_difficult)
    anns = dataset.coco.loadAnns(dataset.coco.getAnnIds(imgIds=[5]))
    assert [(a["category_id"], a["iscrowd"]) for a in anns] == [(2, 0), (3, 1)]
    assert [c["name"] for c in dataset.coco.loadCats([1, 2, 3])] == CLASSES


def test_voc_missing_image_set_file_is_a_user_error_naming_it(devkit):
    with pytest.raises(UserError, match=r"VOC2007/ImageSets/Main/val\.txt: image-set file not found"):
        VOCDetection(devkit, [(2007, "val")], CLASSES)


def test_voc_missing_root_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"nowhere: VOCdevkit folder not found \(data\.root\)"):
        VOCDetection(tmp_path / "nowhere", [(2007, "trainval")], CLASSES)


def test_voc_malformed_xml_is_a_user_error_naming_the_file(devkit):
    (devkit / "VOC2007" / "Annotations" / "000005.xml").write_text("<annotation><size>")
    with pytest.raises(UserError, match=r"000005\.xml: not valid XML"):
        VOCDetection(devkit, [(2007, "trainval")], CLASSES)


def test_voc_unknown_class_is_a_user_error_naming_file_and_object(devkit):
    with pytest.raises(UserError, match=r"000005\.xml: object 1 has class 'dog', which is not in data\.classes"):
        VOCDetection(devkit, [(2007, "trainval")], ["person", "cat"])


def test_voc_missing_annotation_file_is_a_user_error(devkit):
    (devkit / "VOC2012" / "Annotations" / "2008_000008.xml").unlink()
    with pytest.raises(UserError, match=r"2008_000008\.xml: annotation file not found"):
        VOCDetection(devkit, [(2012, "trainval")], CLASSES)


def test_build_dataset_reads_voc_from_the_config(devkit):
    data_cfg = OmegaConf.load(CONF_DIR / "data" / "voc.yaml")
    data_cfg.root = str(devkit)
    data_cfg.classes = CLASSES
    data_cfg.train_sets = [[2007, "trainval"], [2012, "trainval"]]
    data_cfg.limit_train_images = 1
    train = build_dataset(data_cfg, "train", train=True, seed=0)
    val = build_dataset(data_cfg, "val", train=False)
    assert len(train) == 1 and len(train.coco.getImgIds()) == 1
    assert val.image_ids == [12]
    image, target = val[0]
    assert image.shape[-2:] == (1000, 500)  # short side 600 would make the long side pass max_size 1000
    assert target["orig_size"].tolist() == [60, 30]
