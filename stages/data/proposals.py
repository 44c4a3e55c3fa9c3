"""Unsupervised box proposals for box-domain pre-training: OpenCV selective search, a SoCo-style filter,
parallel computation and a JSON cache keyed by the dataset and every proposal parameter.

Boxes are float xyxy in the pixels of the image file (not of any transformed view), kept in selective
search's own order, so "the first N" means the same as the reference's `SelectTopKProposals`.
"""

import ctypes
import ctypes.util
import hashlib
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from stages.engine.distributed import main_process_first
from stages.engine.files import atomic_write_text, read_keyed_cache
from stages.errors import UserError

log = logging.getLogger(__name__)

# Bump when the stored layout or the meaning of a parameter changes, so old caches are rebuilt.
CACHE_FORMAT = 1
SEARCH_MODES = ("fast", "quality", "single")
# Every key of `stage.proposals` that changes the boxes; all of them enter the cache key.
PROPOSAL_PARAMS = (
    "mode",
    "scale",
    "inc_k",
    "sigma",
    "max_side",
    "seed",
    "min_size",
    "max_aspect_ratio",
    "max_area_ratio",
    "nms_iou",
    "max_per_image",
)
START_METHODS = ("fork", "spawn", "forkserver")
# Decimals kept in the cache; the returned boxes always pass through the same rounding.
BOX_DECIMALS = 2

_libc: ctypes.CDLL | None = None


def _seed_c_rand(seed: int) -> None:
    """Seeds the C library's `rand()`.

    OpenCV's selective search ranks regions with `rand() * level` and never seeds it, so without this the
    order of the boxes (and thus the top N) depends on how many images the process has handled before.
    """
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        if name is None:
            log.warning("proposals: no C library found to seed rand(); proposal order is not reproducible")
            return
        _libc = ctypes.CDLL(name)
    _libc.srand(ctypes.c_uint(seed))


def selective_search(
    image_rgb: np.ndarray,
    mode: str = "fast",
    *,
    scale: int,
    inc_k: int,
    sigma: float,
    max_side: int | None,
    seed: int,
) -> np.ndarray:
    """Selective search boxes of an HxWx3 uint8 RGB image, float64 [N, 4] xyxy in its pixels, in
    selective search's order (duplicates removed by OpenCV).

    `mode`: "fast" (HSV + Lab, k = scale, scale + inc_k, scale + 2 inc_k, two strategies), "quality"
    (five colour spaces, five k, four strategies) or "single" (HSV, one segmentation with k = scale, all
    four similarities; with scale=300, sigma=0.9 this matches SoCo's settings, OpenCV's graph segmentation
    keeping its own min_size of 100). The search runs on a copy resized so the longer side is at most
    `max_side` (None: full size); boxes are mapped back and clipped to the original image. `seed` seeds
    the C `rand()` that orders the regions, so the same image always gives the same boxes.
    """
    if mode not in SEARCH_MODES:
        raise ValueError(f"selective_search: mode {mode!r}; expected one of {SEARCH_MODES}")
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise ValueError(f"selective_search: expected an HxWx3 uint8 image, got {image_rgb.shape} {image_rgb.dtype}")
    height, width = image_rgb.shape[:2]
    factor = 1.0 if max_side is None else min(1.0, max_side / max(height, width))
    small = image_rgb
    if factor < 1.0:
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        small = cv2.resize(image_rgb, size, interpolation=cv2.INTER_AREA)
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(np.ascontiguousarray(small[:, :, ::-1]))  # OpenCV converts from BGR
    if mode == "fast":
        search.switchToSelectiveSearchFast(int(scale), int(inc_k), float(sigma))
    elif mode == "quality":
        search.switchToSelectiveSearchQuality(int(scale), int(inc_k), float(sigma))
    else:
        search.switchToSingleStrategy(int(scale), float(sigma))
    _seed_c_rand(seed)
    rects = np.asarray(search.process(), dtype=np.float64).reshape(-1, 4)  # x, y, w, h
    boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)
    small_h, small_w = small.shape[:2]
    boxes *= np.array([width / small_w, height / small_h, width / small_w, height / small_h])
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    return boxes


def filter_proposals(
    boxes: np.ndarray,
    image_size: tuple[int, int],
    min_size: float,
    max_aspect_ratio: float,
    max_area_ratio: float,
    max_per_image: int | None,
    nms_iou: float | None = None,
) -> np.ndarray:
    """The boxes (xyxy, [N, 4]) that pass, in their given order.

    Kept: both sides >= `min_size` px; w/h in [1/max_aspect_ratio, max_aspect_ratio];
    sqrt(box area / image area) <= `max_area_ratio` (`image_size` is (h, w)). Then, if `nms_iou` is set,
    a box overlapping an earlier kept box above that IoU is dropped (earlier = higher priority). Finally
    the first `max_per_image` (None: all).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    height, width = image_size
    box_w = boxes[:, 2] - boxes[:, 0]
    box_h = boxes[:, 3] - boxes[:, 1]
    keep = (box_w >= min_size) & (box_h >= min_size)
    aspect = box_w / np.maximum(box_h, np.finfo(np.float64).tiny)
    keep &= (aspect >= 1.0 / max_aspect_ratio) & (aspect <= max_aspect_ratio)
    keep &= np.sqrt(box_w * box_h / (height * width)) <= max_area_ratio
    boxes = boxes[keep]
    if nms_iou is not None and len(boxes) > 1:
        import torch
        from torchvision.ops import nms

        # Scores that fall with the position make NMS keep the earlier box and return the original order.
        scores = -torch.arange(len(boxes), dtype=torch.float64)
        kept = nms(torch.from_numpy(boxes), scores, float(nms_iou)).numpy()
        boxes = boxes[np.sort(kept)]
    if max_per_image is not None:
        boxes = boxes[:max_per_image]
    return boxes


@dataclass
class ProposalStats:
    """What `load_or_compute_proposals` did."""

    num_images: int
    num_skipped: int  # images left without any proposal (absent from the returned dict)
    num_boxes: int
    seconds: float
    images_per_second: float
    cache_hit: bool
    cache_path: str
    # The cache's sha256 key: names these exact boxes (caches derived from them, the pseudo-classes, key on it).
    cache_key: str

    @property
    def boxes_per_image(self) -> float:
        kept = self.num_images - self.num_skipped
        return self.num_boxes / kept if kept else 0.0


def _check_params(proposals_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters in PROPOSAL_PARAMS as plain values; a missing or bad one is a UserError."""
    missing = [name for name in PROPOSAL_PARAMS if name not in proposals_cfg]
    if missing:
        raise UserError(f"stage.proposals: missing {missing}; expected all of {list(PROPOSAL_PARAMS)}")
    params = {name: proposals_cfg[name] for name in PROPOSAL_PARAMS}
    if params["mode"] not in SEARCH_MODES:
        raise UserError(f"stage.proposals.mode: got {params['mode']!r}; expected one of {list(SEARCH_MODES)}")
    for name in ("scale", "inc_k"):
        if not isinstance(params[name], int) or params[name] <= 0:
            raise UserError(f"stage.proposals.{name}: got {params[name]!r}; expected a positive int")
    positive = ("sigma", "max_aspect_ratio", "max_area_ratio")
    for name in positive:
        if not isinstance(params[name], int | float) or params[name] <= 0:
            raise UserError(f"stage.proposals.{name}: got {params[name]!r}; expected a number > 0")
    if params["max_aspect_ratio"] < 1:
        raise UserError(f"stage.proposals.max_aspect_ratio: got {params['max_aspect_ratio']}; expected >= 1")
    if not isinstance(params["min_size"], int | float) or params["min_size"] < 1:
        raise UserError(f"stage.proposals.min_size: got {params['min_size']!r}; expected a number >= 1 (px)")
    for name in ("max_side", "max_per_image"):
        value = params[name]
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise UserError(f"stage.proposals.{name}: got {value!r}; expected a positive int or null")
    nms_iou = params["nms_iou"]
    if nms_iou is not None and (not isinstance(nms_iou, int | float) or not 0 < nms_iou <= 1):
        raise UserError(f"stage.proposals.nms_iou: got {nms_iou!r}; expected a number in (0, 1] or null")
    if not isinstance(params["seed"], int) or params["seed"] < 0:
        raise UserError(f"stage.proposals.seed: got {params['seed']!r}; expected an int >= 0")
    return params


def proposals_for_image(image_rgb: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
    """Selective search then the filter, for one image, with the parameters of PROPOSAL_PARAMS."""
    boxes = selective_search(
        image_rgb,
        params["mode"],
        scale=params["scale"],
        inc_k=params["inc_k"],
        sigma=params["sigma"],
        max_side=params["max_side"],
        seed=params["seed"],
    )
    return filter_proposals(
        boxes,
        image_rgb.shape[:2],
        min_size=params["min_size"],
        max_aspect_ratio=params["max_aspect_ratio"],
        max_area_ratio=params["max_area_ratio"],
        max_per_image=params["max_per_image"],
        nms_iou=params["nms_iou"],
    )


# Per-worker state, set once by the pool initializer so the dataset is not sent with every task.
_worker_dataset: Any = None
_worker_params: dict[str, Any] = {}


def _init_worker(dataset: Any, params: dict[str, Any]) -> None:
    global _worker_dataset, _worker_params
    # Parallelism comes from the worker processes; OpenCV threads would only oversubscribe the cores.
    cv2.setNumThreads(1)
    _worker_dataset, _worker_params = dataset, params


def _compute_one(index: int) -> list[list[float]]:
    boxes = proposals_for_image(_worker_dataset.load_image(index), _worker_params)
    return np.round(boxes, BOX_DECIMALS).tolist()


def _cache_key(dataset: Any, params: Mapping[str, Any]) -> str:
    source = str(dataset.source)
    annotation = None
    if os.path.isfile(source):
        stat = os.stat(source)
        annotation = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    identity = {
        "format": CACHE_FORMAT,
        "opencv": cv2.__version__,
        "source": os.path.abspath(source),
        "annotation": annotation,
        "image_ids": list(dataset.image_ids),
        "params": dict(params),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _read_cache(path: Path, key: str, image_ids: list) -> list[list[list[float]]] | None:
    """The stored boxes if `path` holds a cache for exactly this key and these image ids, else None."""
    boxes = read_keyed_cache(path, key, image_ids, "boxes", "proposals")
    if boxes is not None and len(boxes) != len(image_ids):
        log.warning(
            "proposals: cache %s has %d box lists for %d images; rebuilding it", path, len(boxes), len(image_ids)
        )
        return None
    return boxes


def _compute_all(dataset: Any, params: dict[str, Any], num_workers: int, start_method: str) -> list:
    global _worker_dataset, _worker_params
    indices = range(len(dataset))
    progress = {"total": len(dataset), "desc": "proposals", "unit": "img"}
    if num_workers == 0:
        _worker_dataset, _worker_params = dataset, params
        try:
            return [_compute_one(i) for i in tqdm(indices, **progress)]
        finally:
            _worker_dataset, _worker_params = None, {}
    context = multiprocessing.get_context(start_method)
    parent_threads = cv2.getNumThreads()
    if start_method == "fork":
        # A forked child that sets OpenCV's thread count waits forever for the parent's pool threads, which
        # it did not inherit; with the parent at one thread there is no pool to wait for.
        cv2.setNumThreads(1)
    try:
        with context.Pool(num_workers, initializer=_init_worker, initargs=(dataset, params)) as pool:
            return list(tqdm(pool.imap(_compute_one, indices), **progress))
    finally:
        cv2.setNumThreads(parent_threads)


def load_or_compute_proposals(
    dataset: Any,
    proposals_cfg: Mapping[str, Any],
    cache_dir: str | os.PathLike,
    num_workers: int,
) -> tuple[dict[Any, np.ndarray], ProposalStats]:
    """Filtered selective-search proposals for every image of `dataset`, from the cache when it matches.

    `dataset` needs `load_image(index) -> HxWx3 uint8 RGB`, `image_ids`, `source` and `__len__`.
    `proposals_cfg` holds every key of PROPOSAL_PARAMS plus `start_method` ("fork", "spawn" or
    "forkserver": the multiprocessing context; spawn needs a picklable dataset), which is not in the key.
    `num_workers` processes (0: this process) each load their own images.

    The cache is one JSON file in `cache_dir` named by a sha256 key of the dataset source, its image ids,
    the source file's size and mtime (when `source` is a file), the OpenCV version and the parameters; it
    stores the key, the parameters, the image ids and the boxes, and is rebuilt (written atomically)
    whenever the stored key or image ids disagree.

    Returns `{image_id: float32 [N, 4] xyxy}` for the images with at least one proposal (the others are
    skipped and counted) and the stats. Raises UserError when no image has a proposal.
    """
    params = _check_params(proposals_cfg)
    if not isinstance(num_workers, int) or num_workers < 0:
        raise UserError(f"stage.proposals.num_workers: got {num_workers!r}; expected an int >= 0")
    start_method = proposals_cfg.get("start_method")
    if start_method not in START_METHODS:
        raise UserError(f"stage.proposals.start_method: got {start_method!r}; expected one of {START_METHODS}")
    image_ids = list(dataset.image_ids)
    if len(image_ids) != len(dataset):
        raise ValueError(f"{dataset.source}: {len(image_ids)} image ids for {len(dataset)} images")
    key = _cache_key(dataset, params)
    path = Path(cache_dir) / f"proposals-{key[:16]}.json"

    start = time.perf_counter()
    boxes = _read_cache(path, key, image_ids)
    cache_hit = boxes is not None
    if boxes is None:
        log.info(
            "proposals: computing for %d images of %s with %d workers",
            len(image_ids),
            dataset.source,
            num_workers,
        )
        boxes = _compute_all(dataset, params, num_workers, start_method)
        payload = {
            "key": key,
            "format": CACHE_FORMAT,
            "opencv": cv2.__version__,
            "source": str(dataset.source),
            "params": params,
            "image_ids": image_ids,
            "boxes": boxes,
        }
        atomic_write_text(path, json.dumps(payload))
    seconds = time.perf_counter() - start

    proposals = {
        image_id: np.asarray(image_boxes, dtype=np.float32).reshape(-1, 4)
        for image_id, image_boxes in zip(image_ids, boxes, strict=True)
        if len(image_boxes) > 0
    }
    stats = ProposalStats(
        num_images=len(image_ids),
        num_skipped=len(image_ids) - len(proposals),
        num_boxes=sum(len(b) for b in proposals.values()),
        seconds=seconds,
        images_per_second=len(image_ids) / seconds if seconds > 0 else float("inf"),
        cache_hit=cache_hit,
        cache_path=str(path),
        cache_key=key,
    )
    how = f"loaded from cache {path}" if cache_hit else f"computed and cached in {path}"
    log.info(
        "proposals: %d images %s in %.1f s (%.1f images/s), %.1f boxes per image",
        stats.num_images,
        how,
        seconds,
        stats.images_per_second,
        stats.boxes_per_image,
    )
    if stats.num_skipped:
        log.info(
            "proposals: %d of %d images had no usable proposal and are skipped",
            stats.num_skipped,
            stats.num_images,
        )
    if not proposals:
        raise UserError(
            f"{dataset.source}: none of its {len(image_ids)} images kept a proposal after filtering "
            f"(min_size={params['min_size']}, max_aspect_ratio={params['max_aspect_ratio']}, "
            f"max_area_ratio={params['max_area_ratio']}); expected at least one: lower "
            "stage.proposals.min_size or raise max_area_ratio"
        )
    return proposals, stats


def proposals_main_first(dataset, proposals_cfg: Mapping[str, Any]) -> tuple[dict, ProposalStats]:
    """The main process computes (or reads) the cache first; the other ranks then read it."""
    return main_process_first(
        load_or_compute_proposals, dataset, proposals_cfg, proposals_cfg["cache_dir"], proposals_cfg["num_workers"]
    )
