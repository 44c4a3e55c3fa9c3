"""Pascal VOC from a local VOCdevkit folder, converted in memory to COCO and read by the COCO loader."""

import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from stages.data.coco import CocoDetection, Transform
from stages.errors import UserError

# VOC image names: "000005" (2007) or "2008_000008" (2010-2012).
_NUMERIC_NAME = re.compile(r"\d+(_\d+)?")


def _text(element: ET.Element, path: str, xml: Path, where: str) -> str:
    found = element.find(path)
    if found is None or found.text is None or not found.text.strip():
        raise UserError(f"{xml}: {where} has no <{path}>")
    return found.text.strip()


def _number(element: ET.Element, path: str, xml: Path, where: str) -> float:
    text = _text(element, path, xml, where)
    try:
        return float(text)
    except ValueError:
        raise UserError(f"{xml}: {where} has <{path}> {text!r}; expected a number") from None


def _parse_xml(xml: Path, class_ids: dict[str, int]) -> tuple[int, int, list[dict]]:
    """(height, width, objects) of one VOC annotation file; each object has `category_id`, COCO `bbox`
    (VOC's 1-based inclusive corners shifted to 0-based continuous pixels) and `difficult`."""
    if not xml.is_file():
        raise UserError(f"{xml}: annotation file not found")
    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError as err:
        raise UserError(f"{xml}: not valid XML ({err})") from None
    height, width = int(_number(root, "size/height", xml, "<size>")), int(_number(root, "size/width", xml, "<size>"))
    if height <= 0 or width <= 0:
        raise UserError(f"{xml}: <size> is {height}x{width}; expected positive height and width")
    objects = []
    for index, obj in enumerate(root.findall("object")):
        where = f"object {index}"
        name = _text(obj, "name", xml, where)
        if name not in class_ids:
            raise UserError(f"{xml}: {where} has class {name!r}, which is not in data.classes")
        difficult = obj.find("difficult")
        is_difficult = difficult is not None and (difficult.text or "0").strip() not in ("0", "")
        x1 = _number(obj, "bndbox/xmin", xml, where) - 1
        y1 = _number(obj, "bndbox/ymin", xml, where) - 1
        x2, y2 = _number(obj, "bndbox/xmax", xml, where), _number(obj, "bndbox/ymax", xml, where)
        if x2 <= x1 or y2 <= y1:
            raise UserError(f"{xml}: {where} ({name}) has an empty box {x1 + 1, y1 + 1, x2, y2}; expected max >= min")
        objects.append({"category_id": class_ids[name], "bbox": [x1, y1, x2 - x1, y2 - y1], "difficult": is_difficult})
    return height, width, objects


def _image_names(root: Path, image_sets: Sequence[Sequence]) -> list[tuple[str, str]]:
    """(year, name) of every image listed in the `(year, set)` pairs' ImageSets/Main/<set>.txt files."""
    names: list[tuple[str, str]] = []
    for entry in image_sets:
        if len(entry) != 2:
            raise UserError(f"data.*_sets: entry {list(entry)} is not a (year, image-set) pair")
        year, image_set = str(entry[0]), str(entry[1])
        set_file = root / f"VOC{year}" / "ImageSets" / "Main" / f"{image_set}.txt"
        if not set_file.is_file():
            raise UserError(f"{set_file}: image-set file not found; expected VOC<year>/ImageSets/Main/<set>.txt")
        names.extend((year, line.split()[0]) for line in set_file.read_text().splitlines() if line.strip())
    if len(set(names)) != len(names):
        raise UserError(f"{root}: the image sets {list(map(list, image_sets))} list an image twice")
    return names


def _image_ids(names: list[tuple[str, str]]) -> list[int]:
    """Integer image ids that do not depend on which sets are listed: "2008_000008" -> 2008000008,
    "000005" -> 5 (VOC's own names never collide this way). Other names fall back to 1..N in listing order."""
    if all(_NUMERIC_NAME.fullmatch(name) for _, name in names):
        ids = [int(name.replace("_", "")) for _, name in names]
        if len(set(ids)) == len(ids):
            return ids
    return list(range(1, len(names) + 1))


class VOCDetection(CocoDetection):
    """Pascal VOC images listed by `(year, image_set)` pairs under a VOCdevkit `root`.

    Categories are ids 1..C in the order of `classes` (so label i is `classes[i]`). Objects marked difficult
    are left out of the training targets unless `keep_difficult`, and are always crowd (ignored) in the
    in-memory COCO ground truth that evaluation uses. Items and properties are those of CocoDetection.
    """

    def __init__(
        self,
        root: str | Path,
        image_sets: Sequence[Sequence],
        classes: Sequence[str],
        keep_difficult: bool = False,
        transforms: Transform | None = None,
        image_ids: Sequence[int] | None = None,
    ):
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"{root}: VOCdevkit folder not found (data.root)")
        if len(set(classes)) != len(classes) or not classes:
            raise UserError(f"data.classes: {list(classes)}; expected a non-empty list of distinct names")
        self.keep_difficult = keep_difficult
        class_ids = {name: index + 1 for index, name in enumerate(classes)}
        names = _image_names(root, image_sets)
        images, annotations = [], []
        for image_id, (year, name) in zip(_image_ids(names), names, strict=True):
            xml = root / f"VOC{year}" / "Annotations" / f"{name}.xml"
            height, width, objects = _parse_xml(xml, class_ids)
            file_name = f"VOC{year}/JPEGImages/{name}.jpg"
            images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
            for obj in objects:
                w, h = obj["bbox"][2], obj["bbox"][3]
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": obj["category_id"],
                        "bbox": obj["bbox"],
                        "area": w * h,
                        "iscrowd": int(obj["difficult"]),
                    }
                )
        categories = [{"id": cat_id, "name": name} for name, cat_id in class_ids.items()]
        dataset = {"images": images, "annotations": annotations, "categories": categories}
        self._setup(dataset, root, str(root), transforms, image_ids)

    def _keep_for_training(self, ann: dict) -> bool:
        # VOC has no crowds: iscrowd marks the difficult objects.
        return self.keep_difficult or not ann["iscrowd"]
