"""The built-in synthetic detection dataset: coloured shapes on textured, noisy backgrounds, written once as
COCO files (PNG images + JSON) and then read by the same COCO loader as user data.

Each image is drawn from its own numpy Generator seeded with (seed, split, index), so the files are identical
byte for byte across runs and an image does not change when the dataset grows. The generator's parameters are
stored in `<root>/generator.json`; when they differ from the configured ones the dataset is regenerated into a
temporary folder that replaces `root` only when complete, under a file lock (several processes may start at
once).
"""

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import cv2
import numpy as np
from omegaconf import DictConfig, OmegaConf

from stages.engine.files import file_lock
from stages.errors import UserError

log = logging.getLogger(__name__)

# Bump when the drawing code changes, so stored datasets made by older code are regenerated.
FORMAT_VERSION = 1
RECORD_FILE = "generator.json"
SPLITS = ("train", "val")
# Sub-pixel precision of cv2 drawing calls (coordinates are multiplied by 2**bits).
_SHIFT_BITS = 4
_SCALE = 1 << _SHIFT_BITS

# Shape name -> renderer(width, height, stroke, outlined, rng) -> uint8 mask (height, width) in 0..255.
Renderer = Callable[[int, int, int, bool, np.random.Generator], np.ndarray]


def _points(points: np.ndarray) -> np.ndarray:
    return np.round(points * _SCALE).astype(np.int32)


def _ellipse(width: int, height: int, stroke: int) -> np.ndarray:
    """A filled ellipse touching the box edges, or with `stroke` > 0 a ring of that width."""
    mask = np.zeros((height, width), np.uint8)
    inset = stroke / 2 if stroke > 0 else 0.0
    center = (round((width / 2 - 0.5) * _SCALE), round((height / 2 - 0.5) * _SCALE))
    axes = (round((width / 2 - inset) * _SCALE), round((height / 2 - inset) * _SCALE))
    cv2.ellipse(mask, center, axes, 0, 0, 360, 255, stroke if stroke > 0 else -1, cv2.LINE_AA, _SHIFT_BITS)
    return mask


def _triangle_mask(width: int, height: int, vertices: np.ndarray, stroke: int, outlined: bool) -> np.ndarray:
    """A filled triangle; outlined: the band of width `stroke` inside its edges (the triangle minus a copy
    shrunk about its incentre by the stroke)."""
    mask = np.zeros((height, width), np.uint8)
    cv2.fillPoly(mask, [_points(vertices - 0.5)], 255, cv2.LINE_AA, _SHIFT_BITS)
    if outlined:
        sides = np.linalg.norm(np.roll(vertices, -1, axis=0) - vertices, axis=1)  # side i: vertex i -> i+1
        # Incentre: vertices weighted by the lengths of their opposite sides; inradius = area / half-perimeter.
        opposite = np.roll(sides, -1)
        center = (vertices * opposite[:, None]).sum(0) / opposite.sum()
        following = np.roll(vertices, -1, axis=0)
        area = 0.5 * abs((vertices[:, 0] * following[:, 1] - following[:, 0] * vertices[:, 1]).sum())
        shrink = max(0.0, 1 - stroke / (area / (sides.sum() / 2)))
        inner = center + (vertices - center) * shrink
        cv2.fillPoly(mask, [_points(inner - 0.5)], 0, cv2.LINE_AA, _SHIFT_BITS)
    return mask


def _circle(width: int, height: int, stroke: int, outlined: bool, rng: np.random.Generator) -> np.ndarray:
    return _ellipse(width, height, 0)


def _ring(width: int, height: int, stroke: int, outlined: bool, rng: np.random.Generator) -> np.ndarray:
    return _ellipse(width, height, stroke)


def _square(width: int, height: int, stroke: int, outlined: bool, rng: np.random.Generator) -> np.ndarray:
    mask = np.full((height, width), 255, np.uint8)
    if outlined:
        mask[stroke : height - stroke, stroke : width - stroke] = 0
    return mask


def _triangle(width: int, height: int, stroke: int, outlined: bool, rng: np.random.Generator) -> np.ndarray:
    w, h = float(width), float(height)
    orientations = [
        [(0, h), (w, h), (w / 2, 0)],  # apex up
        [(0, 0), (w, 0), (w / 2, h)],  # apex down
        [(w, 0), (w, h), (0, h / 2)],  # apex left
        [(0, 0), (0, h), (w, h / 2)],  # apex right
    ]
    vertices = np.array(orientations[int(rng.integers(len(orientations)))], dtype=np.float64)
    return _triangle_mask(width, height, vertices, stroke, outlined)


def _cross(width: int, height: int, stroke: int, outlined: bool, rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    top, left = (height - stroke) // 2, (width - stroke) // 2
    mask[top : top + stroke, :] = 255
    mask[:, left : left + stroke] = 255
    return mask


SHAPES: dict[str, Renderer] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "cross": _cross,
    "ring": _ring,
}
# A filled circle outlined would be a ring, so only these come in both styles.
OUTLINABLE = {"square", "triangle"}


def _params(data_cfg: DictConfig | dict) -> dict:
    generator = data_cfg["generator"]
    params = OmegaConf.to_container(generator, resolve=True) if isinstance(generator, DictConfig) else generator
    return json.loads(json.dumps(params))  # plain JSON types, so it compares equal to the stored record


def _check_params(params: dict) -> None:
    """UserError naming `data.generator.<key>` for values the generator cannot use."""

    def fail(key: str, expected: str) -> NoReturn:
        raise UserError(f"data.generator.{key}: got {params.get(key)!r}; expected {expected}")

    def check_range(key: str, low: float, high: float = float("inf"), low_allowed: bool = True) -> None:
        value = params.get(key)
        ok = isinstance(value, list) and len(value) == 2 and all(isinstance(v, int | float) for v in value)
        if not ok or not (value[0] >= low if low_allowed else value[0] > low) or not value[0] <= value[1] <= high:
            upper = "" if high == float("inf") else f" <= {high}"
            fail(key, f"[low, high] with {low} {'<=' if low_allowed else '<'} low <= high{upper}")

    keys = [
        "seed", "num_train", "num_val", "image_size", "classes", "objects_per_image", "object_scale",
        "aspect_ratio", "outline_prob", "stroke_width", "max_occlusion", "min_contrast", "background_grids",
        "stripe_prob", "stripe_period", "stripe_amplitude", "noise_std", "max_tries",
    ]  # fmt: skip
    for key in keys:
        if key not in params:
            raise UserError(f"data.generator: missing key {key!r}")
    for key in ("seed", "num_train", "num_val", "max_tries"):
        if not isinstance(params[key], int) or params[key] < (0 if key == "seed" else 1):
            fail(key, "a non-negative int" if key == "seed" else "a positive int")
    classes = params["classes"]
    if not classes or len(set(classes)) != len(classes) or not set(classes) <= set(SHAPES):
        fail("classes", f"distinct names from {sorted(SHAPES)}")
    # Objects are at least 3 pixels a side, so images need a few more.
    check_range("image_size", 8)
    check_range("objects_per_image", 1)
    check_range("object_scale", 0.0, 1.0, low_allowed=False)
    check_range("aspect_ratio", 0.0, low_allowed=False)
    # A stroke of half the shorter side already fills the shape.
    check_range("stroke_width", 0.0, 0.5)
    check_range("stripe_period", 0.0, low_allowed=False)
    if not params["background_grids"] or any(not isinstance(g, int) or g < 1 for g in params["background_grids"]):
        fail("background_grids", "a non-empty list of positive ints")
    for key in ("outline_prob", "max_occlusion", "stripe_prob"):
        if not 0 <= params[key] <= 1:
            fail(key, "a number in [0, 1]")
    for key in ("min_contrast", "stripe_amplitude", "noise_std"):
        if params[key] < 0:
            fail(key, "a number >= 0")


def _background(height: int, width: int, params: dict, rng: np.random.Generator) -> np.ndarray:
    """Float32 HxWx3 in about [0, 1]: a random mix of smooth colour fields (coarse random colour grids
    upsampled; a 2x2 grid is a gradient, finer ones are blobs) plus, sometimes, stripes."""
    grids = params["background_grids"]
    weights = rng.dirichlet(np.ones(len(grids)))
    image = np.zeros((height, width, 3), np.float32)
    for cells, weight in zip(grids, weights, strict=True):
        field = rng.uniform(0, 1, (cells, cells, 3)).astype(np.float32)
        image += weight * cv2.resize(field, (width, height), interpolation=cv2.INTER_CUBIC)
    if rng.random() < params["stripe_prob"]:
        period = rng.uniform(*params["stripe_period"])
        angle, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        wave = np.sin(2 * np.pi * (xs * np.cos(angle) + ys * np.sin(angle)) / period + phase)
        tint = rng.uniform(-1, 1, 3).astype(np.float32)
        image += params["stripe_amplitude"] * wave[..., None] * tint
    return image


def _draw_image(height: int, width: int, params: dict, rng: np.random.Generator) -> tuple[np.ndarray, list[dict]]:
    """(uint8 HxWx3 RGB image, objects) for one synthetic image; each object is a dict with `label` (class
    index), `bbox` [x, y, w, h] and `visible` (the fraction of its pixels left uncovered).

    Objects are drawn in order, each fully inside the image; a placement that would leave an earlier object
    more than `max_occlusion` hidden (counted on pixels) is redrawn, up to `max_tries` times, else the object
    is skipped. Boxes are the whole object's tight box, occluded parts included.
    """
    image = _background(height, width, params, rng)
    owner = np.full((height, width), -1, np.int32)  # which object each pixel shows; -1 background
    full_area: list[int] = []
    visible: list[int] = []
    objects = []
    classes = params["classes"]
    short = min(height, width)
    log_scale = np.log(params["object_scale"])
    log_aspect = np.log(params["aspect_ratio"])
    for _ in range(int(rng.integers(params["objects_per_image"][0], params["objects_per_image"][1] + 1))):
        label = int(rng.integers(len(classes)))
        shape = classes[label]
        outlined = shape in OUTLINABLE and rng.random() < params["outline_prob"]
        for _attempt in range(params["max_tries"]):
            side = short * np.exp(rng.uniform(*log_scale))
            aspect = np.exp(rng.uniform(*log_aspect))
            w = int(np.clip(round(side * np.sqrt(aspect)), 3, width))
            h = int(np.clip(round(side / np.sqrt(aspect)), 3, height))
            x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            stroke = max(1, round(rng.uniform(*params["stroke_width"]) * min(w, h)))
            mask = SHAPES[shape](w, h, stroke, outlined, rng)
            covered = mask >= 128
            region = (slice(y0, y0 + h), slice(x0, x0 + w))
            under = owner[region][covered]
            hidden = np.bincount(under[under >= 0], minlength=len(full_area))
            if not covered.any() or any(
                full_area[j] - visible[j] + hidden[j] > params["max_occlusion"] * full_area[j]
                for j in range(len(full_area))
            ):
                continue
            color = _contrasting_color(image[region][covered].mean(0), params, rng)
            alpha = (mask.astype(np.float32) / 255)[..., None]
            image[region] = image[region] * (1 - alpha) + color * alpha
            owner[region][covered] = len(full_area)
            visible = [v - int(n) for v, n in zip(visible, hidden, strict=True)]
            full_area.append(int(covered.sum()))
            visible.append(full_area[-1])
            ys, xs = np.nonzero(covered)
            box = [x0 + int(xs.min()), y0 + int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
            objects.append({"label": label, "bbox": box})
            break
    for obj, seen, area in zip(objects, visible, full_area, strict=True):
        obj["visible"] = seen / area
    image += rng.normal(0, params["noise_std"], image.shape).astype(np.float32)
    return np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8), objects


def _contrasting_color(under: np.ndarray, params: dict, rng: np.random.Generator) -> np.ndarray:
    """A random RGB colour at least `min_contrast` (Euclidean, [0, 1] units) from `under`, the mean colour
    the object will cover; the most distant of `max_tries` draws if none is."""
    best, best_distance = None, -1.0
    for _ in range(params["max_tries"]):
        color = rng.uniform(0, 1, 3).astype(np.float32)
        distance = float(np.linalg.norm(color - under))
        if distance >= params["min_contrast"]:
            return color
        if distance > best_distance:
            best, best_distance = color, distance
    return best


def _write_split(folder: Path, split: str, split_code: int, count: int, params: dict, files: dict) -> int:
    """Writes one split's PNGs and COCO JSON under `folder`; returns the number of objects."""
    image_dir = folder / files[f"{split}_images"]
    image_dir.mkdir(parents=True, exist_ok=True)
    classes = params["classes"]
    # Sparse category ids (1, 3, 5, ...) so the same id -> label mapping as real COCO files is exercised.
    categories = [{"id": 2 * i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(classes)]
    images, annotations = [], []
    low, high = params["image_size"]
    for index in range(count):
        rng = np.random.default_rng([params["seed"], split_code, index])
        height, width = (int(v) for v in rng.integers(low, high + 1, size=2))
        pixels, objects = _draw_image(height, width, params, rng)
        file_name = f"{index + 1:06d}.png"
        ok, encoded = cv2.imencode(".png", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR))
        if not ok:
            raise RuntimeError(f"cv2 could not encode {file_name}")
        (image_dir / file_name).write_bytes(encoded.tobytes())
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for obj in objects:
            label, box = obj["label"], obj["bbox"]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": categories[label]["id"],
                    "bbox": [float(v) for v in box],
                    "area": float(box[2] * box[3]),
                    "iscrowd": 0,
                }
            )
    dataset = {
        "info": {"description": f"synthetic shapes, {split} split", "generator": params},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    json_path = folder / files[f"{split}_json"]
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(dataset))
    return len(annotations)


def _record(data_cfg: DictConfig | dict) -> dict:
    """What the stored dataset must match: the format version, generator parameters and file layout."""
    files = {f"{split}_{kind}": str(data_cfg[f"{split}_{kind}"]) for split in SPLITS for kind in ("images", "json")}
    return {"format": FORMAT_VERSION, "generator": _params(data_cfg), "files": files}


def _is_current(root: Path, record: dict) -> bool:
    record_path = root / RECORD_FILE
    if not record_path.is_file():
        return False
    try:
        stored = json.loads(record_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return stored == record and all((root / record["files"][f"{s}_json"]).is_file() for s in SPLITS)


def ensure_synthetic(data_cfg: DictConfig | dict) -> None:
    """Makes sure `data_cfg.root` holds the synthetic dataset for `data_cfg.generator`, generating it if it is
    missing or was made with other parameters. Refuses (UserError) to replace a non-empty folder it did not
    make."""
    root = Path(str(data_cfg["root"]))
    record = _record(data_cfg)
    if _is_current(root, record):
        return
    _check_params(record["generator"])
    root.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(root.parent / f".{root.name}.lock", waiting=f"waiting for another process generating {root}"):
        if _is_current(root, record):  # another process made it while we waited
            return
        if root.exists() and not (root / RECORD_FILE).is_file() and any(root.iterdir()):
            raise UserError(
                f"data.root: {root} is not empty and holds no {RECORD_FILE}; expected a new or synthetic folder"
            )
        # Under the lock, leftovers of a killed generation belong to no live process.
        for leftover in root.parent.glob(f".{root.name}.partial-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        partial = root.parent / f".{root.name}.partial-{os.getpid()}"
        started = time.perf_counter()
        params = record["generator"]
        counts = {
            split: _write_split(partial, split, code, params[f"num_{split}"], params, record["files"])
            for code, split in enumerate(SPLITS)
        }
        (partial / RECORD_FILE).write_text(json.dumps(record, indent=2))
        stale = root.parent / f".{root.name}.stale-{os.getpid()}"
        if root.exists():
            os.rename(root, stale)
        os.rename(partial, root)
        shutil.rmtree(stale, ignore_errors=True)
    log.info(
        "synthetic dataset: %d train / %d val images (%d / %d objects) written to %s in %.1f s",
        params["num_train"],
        params["num_val"],
        counts["train"],
        counts["val"],
        root,
        time.perf_counter() - started,
    )


def generation_summary(root: Path) -> dict[str, Any]:
    """Objects per class and per COCO area range (small < 32², large > 96²) in each split of a generated
    dataset; for checking that the problem is balanced."""
    record = json.loads((root / RECORD_FILE).read_text())
    summary = {}
    for split in SPLITS:
        dataset = json.loads((root / record["files"][f"{split}_json"]).read_text())
        names = {c["id"]: c["name"] for c in dataset["categories"]}
        per_class = {name: 0 for name in names.values()}
        per_size = {"small": 0, "medium": 0, "large": 0}
        for ann in dataset["annotations"]:
            per_class[names[ann["category_id"]]] += 1
            area = ann["area"]
            per_size["small" if area < 32**2 else "large" if area > 96**2 else "medium"] += 1
        summary[split] = {
            "images": len(dataset["images"]),
            "objects": len(dataset["annotations"]),
            "per_class": per_class,
            "per_size": per_size,
            "objects_per_image": round(len(dataset["annotations"]) / max(1, len(dataset["images"])), 2),
        }
    return summary
