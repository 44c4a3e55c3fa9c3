"""The one COCO-format detection loader (user data, the synthetic dataset, and VOC converted in memory)."""

import contextlib
import copy
import io
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset

from stages.errors import UserError

log = logging.getLogger(__name__)

Transform = Callable[[Tensor, dict], tuple[Tensor, dict]]
REQUIRED_KEYS = ("images", "annotations", "categories")


def read_json(path: Path) -> Any:
    """The parsed JSON file at `path`; UserError naming the file if it is missing or not valid JSON."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON (line {err.lineno} column {err.colno}: {err.msg})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read ({err})") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_positive_int(value: Any) -> bool:
    return _is_int(value) and value > 0


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and value != ""


# A field's check and what the error message says it expected.
FieldCheck = tuple[Callable[[Any], bool], str]
INT: FieldCheck = (_is_int, "an integer")
POSITIVE_INT: FieldCheck = (_is_positive_int, "a positive integer")
TEXT: FieldCheck = (_is_text, "a non-empty string")


def _check_entries(entries: list, kind: str, fields: dict[str, FieldCheck], source: str) -> None:
    """Every entry of `entries` (the file's `kind` list) is an object holding `fields` that pass their check,
    with unique ids."""
    seen: set[int] = set()
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise UserError(f"{source}: {kind}[{index}] is {type(entry).__name__}; expected an object")
        for field, (check, expected) in fields.items():
            if field not in entry:
                raise UserError(f"{source}: {kind}[{index}] has no {field!r}")
            if not check(entry[field]):
                raise UserError(f"{source}: {kind}[{index}] has {field} {entry[field]!r}; expected {expected}")
        if entry["id"] in seen:
            raise UserError(f"{source}: {kind}[{index}] repeats id {entry['id']}; expected unique ids")
        seen.add(entry["id"])


def validate_coco(dataset: Any, source: str) -> None:
    """Checks a parsed COCO detection file and fills the defaults COCOeval needs (`iscrowd` 0, `area` the box
    area). UserError with the file and the item for anything a loader or COCOeval would trip over."""
    if not isinstance(dataset, dict):
        raise UserError(f"{source}: top level is {type(dataset).__name__}; expected an object")
    for key in REQUIRED_KEYS:
        if key not in dataset:
            raise UserError(f"{source}: missing top-level key {key!r}; expected {', '.join(REQUIRED_KEYS)}")
        if not isinstance(dataset[key], list):
            raise UserError(f"{source}: {key!r} is {type(dataset[key]).__name__}; expected a list")
    _check_entries(dataset["categories"], "categories", {"id": INT, "name": TEXT}, source)
    image_fields = {"id": INT, "file_name": TEXT, "height": POSITIVE_INT, "width": POSITIVE_INT}
    _check_entries(dataset["images"], "images", image_fields, source)
    if not dataset["categories"]:
        raise UserError(f"{source}: 'categories' is empty; expected at least one category")
    category_ids = {c["id"] for c in dataset["categories"]}
    image_ids = {i["id"] for i in dataset["images"]}
    seen: set[int] = set()
    for index, ann in enumerate(dataset["annotations"]):
        if not isinstance(ann, dict) or not _is_int(ann.get("id")):
            raise UserError(f"{source}: annotations[{index}] has no integer 'id'")
        name = f"annotation {ann['id']}"
        if ann["id"] in seen:
            raise UserError(f"{source}: {name} appears twice; expected unique annotation ids")
        seen.add(ann["id"])
        # Type first: 1.0 or True would pass the membership test below (1.0 == 1) and break the id lookups later.
        for field in ("image_id", "category_id"):
            if not _is_int(ann.get(field)):
                raise UserError(f"{source}: {name} has {field} {ann.get(field)!r}; expected an integer")
        if ann["image_id"] not in image_ids:
            raise UserError(f"{source}: {name} has image_id {ann['image_id']!r}, which is not in 'images'")
        if ann["category_id"] not in category_ids:
            raise UserError(f"{source}: {name} has category_id {ann['category_id']!r}, which is not in 'categories'")
        for field in ("iscrowd", "area"):
            if field in ann and not (_is_number(ann[field]) and math.isfinite(ann[field])):
                raise UserError(f"{source}: {name} has {field} {ann[field]!r}; expected a number")
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) and math.isfinite(v) for v in bbox):
            raise UserError(f"{source}: {name} has bbox {bbox!r}; expected [x, y, width, height] numbers")
        # Zero-size boxes occur in real files (two in COCO train2017); they are left out of training.
        for side, value in (("width", bbox[2]), ("height", bbox[3])):
            if value < 0:
                raise UserError(f"{source}: {name} has bbox {side} {float(value)}; expected >= 0")
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(bbox[2] * bbox[3]))


def make_coco(dataset: dict) -> COCO:
    """A pycocotools COCO over an already parsed and validated `dataset` dict, without its console chatter."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoDetection(Dataset):
    """A COCO-format detection dataset: `<image_dir>/<file_name>` images and one annotation JSON.

    Items are `(image, target)`: image float32 CHW in [0, 1] (grayscale files become RGB); target `boxes`
    float32 [N, 4] xyxy pixels, `labels` int64 [N] contiguous (category ids sorted ascending -> 0..C-1),
    `image_id`, `orig_size` and `size` int64 [h, w]. Crowd annotations and zero-size boxes are left out of
    the targets but stay in `coco` for COCOeval; images without annotations are kept with empty targets.
    `image_ids` restricts the dataset (and `coco`) to those images, in that order; default: all, sorted.
    """

    def __init__(
        self,
        image_dir: str | Path,
        ann_file: str | Path,
        transforms: Transform | None = None,
        image_ids: Sequence[int] | None = None,
    ):
        super().__init__()
        dataset = read_json(Path(ann_file))
        self._setup(dataset, Path(image_dir), str(ann_file), transforms, image_ids)

    def _setup(
        self,
        dataset: dict,
        image_dir: Path,
        source: str,
        transforms: Transform | None,
        image_ids: Sequence[int] | None,
    ) -> None:
        """Validates `dataset` (a parsed COCO dict) and indexes it; shared with datasets converted to COCO."""
        validate_coco(dataset, source)
        self.source = source
        self.image_dir = image_dir
        self.transforms = transforms
        categories = sorted(dataset["categories"], key=lambda c: c["id"])
        self.label_to_cat_id: list[int] = [c["id"] for c in categories]
        self.class_names: list[str] = [c["name"] for c in categories]
        self._cat_id_to_label = {cat_id: label for label, cat_id in enumerate(self.label_to_cat_id)}
        self._full = dataset
        self._select(sorted(i["id"] for i in dataset["images"]) if image_ids is None else image_ids)
        zero_size = [a["id"] for a in dataset["annotations"] if a["bbox"][2] <= 0 or a["bbox"][3] <= 0]
        if zero_size:
            log.warning(
                "%s: %d annotations with a zero-size box are left out of training (e.g. annotation %s)",
                source,
                len(zero_size),
                zero_size[0],
            )

    def _select(self, image_ids: Sequence[int]) -> None:
        known = {i["id"] for i in self._full["images"]}
        unknown = [i for i in image_ids if i not in known]
        if unknown:
            raise ValueError(f"{self.source}: image ids {unknown[:5]} are not in the file")
        if len(set(image_ids)) != len(image_ids):
            raise ValueError(f"{self.source}: image_ids repeat an id")
        self.image_ids: list[int] = [int(i) for i in image_ids]
        if len(self.image_ids) == len(known):
            self.coco = make_coco(self._full)
            return
        keep = set(self.image_ids)
        subset = {key: value for key, value in self._full.items() if key not in ("images", "annotations")}
        subset["images"] = [i for i in self._full["images"] if i["id"] in keep]
        subset["annotations"] = [a for a in self._full["annotations"] if a["image_id"] in keep]
        self.coco = make_coco(subset)

    def subset(self, image_ids: Sequence[int]) -> "CocoDetection":
        """A copy restricted to `image_ids` (in that order) that shares the parsed file with this one."""
        restricted = copy.copy(self)
        restricted._select(image_ids)
        return restricted

    @property
    def num_classes(self) -> int:
        return len(self.label_to_cat_id)

    def __len__(self) -> int:
        return len(self.image_ids)

    def _keep_for_training(self, ann: dict) -> bool:
        """Whether an annotation belongs in the training targets (COCOeval ignores crowds by itself)."""
        return not ann["iscrowd"]

    def image_path(self, index: int) -> Path:
        return self.image_dir / self.coco.imgs[self.image_ids[index]]["file_name"]

    def load_image(self, index: int) -> np.ndarray:
        """The image file as HxWx3 uint8 RGB; UserError naming the file, image id and path if it is missing,
        unreadable, or not the size the annotation file gives."""
        info = self.coco.imgs[self.image_ids[index]]
        path = self.image_path(index)
        # IMREAD_COLOR turns grayscale and palette files into 3 channels.
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            problem = "cannot be decoded as an image" if path.is_file() else "does not exist"
            raise UserError(f"{self.source}: image {info['id']} file {path} {problem}")
        if image.shape[:2] != (info["height"], info["width"]):
            raise UserError(
                f"{self.source}: image {info['id']} file {path} is {image.shape[0]}x{image.shape[1]} (h x w); "
                f"expected {info['height']}x{info['width']} as the file says"
            )
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    def raw_target(self, index: int) -> dict:
        """The untransformed target of item `index`: boxes xyxy in file pixels (clipped to the image),
        contiguous labels, `image_id`, and `orig_size` = `size` = (h, w) of the file."""
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        height, width = info["height"], info["width"]
        boxes, labels = [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if not self._keep_for_training(ann):
                continue
            x, y, w, h = ann["bbox"]
            x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
            x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
            if x2 > x1 and y2 > y1:
                boxes.append([x1, y1, x2, y2])
                labels.append(self._cat_id_to_label[ann["category_id"]])
        size = torch.tensor([height, width], dtype=torch.int64)
        return {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": int(image_id),
            "orig_size": size,
            "size": size.clone(),
        }

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        image = torch.from_numpy(self.load_image(index)).permute(2, 0, 1).float().div_(255)
        target = self.raw_target(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target
