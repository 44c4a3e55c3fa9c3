"""Pseudo-classes of the box pre-training proposals (AlignDet's detr_pseudo_label setting): each proposal's
k-means cluster id over RoI-pooled features of the image backbone, computed once and cached beside the proposals.

The cache is one JSON file in the proposals' cache folder, named by a sha256 key of the proposals' own cache key,
what decides the backbone's features (the init checkpoint's identity, the backbone and normalisation config),
every clustering parameter and the seed; any change to them gives another key, so the ids are recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from stages.engine.distributed import main_process_first
from stages.engine.files import atomic_write_text, read_keyed_cache
from stages.errors import UserError

log = logging.getLogger(__name__)

# Bump when the stored layout or the meaning of a parameter changes, so old caches are rebuilt.
CACHE_FORMAT = 1
# Every key of `stage.pseudo_classes` that changes the ids (all but `enabled`); all enter the cache key.
CLUSTER_PARAMS = ("num_clusters", "kmeans_iters", "feature_stride", "roi_output_size", "sampling_ratio")


@dataclass
class PseudoClassStats:
    """What `load_or_compute_pseudo_classes` did."""

    num_proposals: int
    num_clusters: int
    # Proposals per cluster id, 0..num_clusters-1.
    cluster_sizes: list[int]
    seconds: float
    cache_hit: bool
    cache_path: str


def check_params(pseudo_cfg: Mapping[str, Any]) -> dict[str, int]:
    """The parameters in CLUSTER_PARAMS as plain ints; a missing or non-positive one is a UserError."""
    missing = [name for name in CLUSTER_PARAMS if name not in pseudo_cfg]
    if missing:
        raise UserError(f"stage.pseudo_classes: missing {missing}; expected all of {list(CLUSTER_PARAMS)}")
    params = {name: pseudo_cfg[name] for name in CLUSTER_PARAMS}
    for name, value in params.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UserError(f"stage.pseudo_classes.{name}: got {value!r}; expected a positive int")
    return params


def kmeans(points: Tensor, num_clusters: int, iters: int, seed: int) -> Tensor:
    """Cluster ids int64 [N] of `points` [N, C] by Lloyd's k-means (squared Euclidean distance) after k-means++
    seeding drawn from a generator seeded with `seed`: the same points and seed give the same ids.

    Lloyd stops after `iters` updates or once no id changes; a cluster left empty keeps its centre.
    Raises ValueError when there are fewer points than clusters.
    """
    num_points = points.shape[0]
    if num_points < num_clusters:
        raise ValueError(f"kmeans: {num_points} points for {num_clusters} clusters; expected at least as many points")
    generator = torch.Generator().manual_seed(seed)
    points = points.detach().to(device="cpu", dtype=torch.float64)
    # k-means++: each next centre drawn with probability proportional to the squared distance to the nearest one.
    first = int(torch.randint(num_points, (1,), generator=generator))
    centers = [points[first]]
    nearest = (points - points[first]).square().sum(dim=1)
    for _ in range(1, num_clusters):
        # All points on the chosen centres (duplicates): any point will do.
        weights = nearest if float(nearest.sum()) > 0 else torch.ones_like(nearest)
        chosen = int(torch.multinomial(weights, 1, generator=generator))
        centers.append(points[chosen])
        nearest = torch.minimum(nearest, (points - points[chosen]).square().sum(dim=1))
    center = torch.stack(centers)

    assignment = torch.cdist(points, center).argmin(dim=1)
    for _ in range(iters):
        sums = torch.zeros_like(center).index_add_(0, assignment, points)
        counts = torch.bincount(assignment, minlength=num_clusters)
        filled = counts > 0
        center[filled] = sums[filled] / counts[filled, None].to(sums.dtype)
        updated = torch.cdist(points, center).argmin(dim=1)
        if torch.equal(updated, assignment):
            break
        assignment = updated
    return assignment


@torch.no_grad()
def proposal_features(
    detector: nn.Module,
    dataset: Any,
    proposals: Mapping[Any, np.ndarray],
    feature_stride: int,
    roi_output_size: int,
    sampling_ratio: int,
) -> Tensor:
    """L2-normalised features [N, C] of every proposal, images in `dataset` order, boxes in their given order.

    Each image (file pixels, the detector's normalisation and padding via `detector.preprocess`) goes through
    `detector.backbone` in eval mode; each proposal is `roi_align`ed on the backbone map of stride
    `feature_stride` to a `roi_output_size` grid (`sampling_ratio` samples per bin), averaged over the grid.
    Normalised because image pre-training compares embeddings by cosine, so k-means then groups by direction.
    """
    backbone = detector.backbone
    strides = list(backbone.strides)
    if feature_stride not in strides:
        raise UserError(
            f"stage.pseudo_classes.feature_stride: got {feature_stride}; expected one of the backbone's {strides}"
        )
    level = strides.index(feature_stride)
    was_training = backbone.training
    backbone.eval()
    features = []
    try:
        for index, image_id in enumerate(dataset.image_ids):
            boxes = proposals.get(image_id)
            if boxes is None or len(boxes) == 0:
                continue
            image = torch.from_numpy(dataset.load_image(index)).permute(2, 0, 1).float().div_(255)
            tensor, _, _ = detector.preprocess([image])
            feature_map = backbone(tensor)[level]
            rois = torch.as_tensor(np.asarray(boxes), dtype=feature_map.dtype, device=feature_map.device)
            pooled = roi_align(
                feature_map,
                [rois.reshape(-1, 4)],
                output_size=roi_output_size,
                spatial_scale=1.0 / feature_stride,
                sampling_ratio=sampling_ratio,
                aligned=True,
            )
            features.append(F.normalize(pooled.mean(dim=(2, 3)).float(), dim=1).cpu())
    finally:
        backbone.train(was_training)
    return torch.cat(features)


def _cache_key(proposals_key: str, feature_identity: Mapping[str, Any], params: Mapping[str, int], seed: int) -> str:
    identity = {
        "format": CACHE_FORMAT,
        "torch": torch.__version__,
        "proposals": proposals_key,
        "features": dict(feature_identity),
        "params": dict(params),
        "seed": int(seed),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def _read_cache(path: Path, key: str, image_ids: list, counts: list[int]) -> list[list[int]] | None:
    """The stored ids if `path` holds a cache for exactly this key, these images and proposal counts, else None."""
    labels = read_keyed_cache(path, key, image_ids, "labels", "pseudo-classes")
    if labels is not None and [len(x) for x in labels] != counts:
        log.warning("pseudo-classes: cache %s does not match these proposals; rebuilding it", path)
        return None
    return labels


def load_or_compute_pseudo_classes(
    dataset: Any,
    proposals: Mapping[Any, np.ndarray],
    feature_detector: Callable[[], nn.Module],
    pseudo_cfg: Mapping[str, Any],
    seed: int,
    cache_dir: str | Path,
    proposals_key: str,
    feature_identity: Mapping[str, Any],
) -> tuple[dict[Any, np.ndarray], PseudoClassStats]:
    """The pseudo-class (cluster id) of every proposal: `{image_id: int64 [N]}` aligned with `proposals`' boxes,
    from the cache when it matches, else computed (`proposal_features`, then `kmeans` with `seed`) and cached.

    `proposals`: `{image_id: [N, 4] xyxy file pixels}` as `load_or_compute_proposals` returned them (whose cache
    key is `proposals_key`); `feature_detector()`, called only on a cache miss, gives the detector whose
    `backbone` (weights as loaded from the init checkpoint) and `preprocess` give the features; `feature_identity`: what else decides those features (the init checkpoint's
    identity, the backbone's config); `pseudo_cfg`: `stage.pseudo_classes`.
    """
    params = check_params(pseudo_cfg)
    image_ids = [image_id for image_id in dataset.image_ids if len(proposals.get(image_id, ())) > 0]
    counts = [len(proposals[image_id]) for image_id in image_ids]
    num_proposals = sum(counts)
    if num_proposals < params["num_clusters"]:
        raise UserError(
            f"stage.pseudo_classes.num_clusters: got {params['num_clusters']} for {num_proposals} proposals; "
            "expected at most the number of proposals"
        )
    key = _cache_key(proposals_key, feature_identity, params, seed)
    path = Path(cache_dir) / f"pseudo-classes-{key[:16]}.json"

    start = time.perf_counter()
    labels = _read_cache(path, key, image_ids, counts)
    cache_hit = labels is not None
    if labels is None:
        log.info("pseudo-classes: clustering %d proposals into %d clusters", num_proposals, params["num_clusters"])
        features = proposal_features(
            feature_detector(),
            dataset,
            proposals,
            feature_stride=params["feature_stride"],
            roi_output_size=params["roi_output_size"],
            sampling_ratio=params["sampling_ratio"],
        )
        ids = kmeans(features, params["num_clusters"], params["kmeans_iters"], seed).tolist()
        offsets = np.cumsum([0, *counts])
        labels = [ids[begin:end] for begin, end in zip(offsets[:-1], offsets[1:])]
        payload = {"key": key, "format": CACHE_FORMAT, "params": params, "seed": seed, "image_ids": image_ids}
        atomic_write_text(path, json.dumps({**payload, "labels": labels}))
    seconds = time.perf_counter() - start

    result = {image_id: np.asarray(ids, dtype=np.int64) for image_id, ids in zip(image_ids, labels, strict=True)}
    sizes = np.bincount(np.concatenate(list(result.values())), minlength=params["num_clusters"]).tolist()
    stats = PseudoClassStats(
        num_proposals=num_proposals,
        num_clusters=params["num_clusters"],
        cluster_sizes=sizes,
        seconds=seconds,
        cache_hit=cache_hit,
        cache_path=str(path),
    )
    how = f"loaded from cache {path}" if cache_hit else f"computed and cached in {path}"
    log.info(
        "pseudo-classes: %d proposals in %d clusters %s in %.1f s; cluster sizes %d..%d",
        num_proposals,
        params["num_clusters"],
        how,
        seconds,
        min(sizes),
        max(sizes),
    )
    return result, stats


def pseudo_classes_main_first(*args: Any, **kwargs: Any) -> tuple[dict[Any, np.ndarray], PseudoClassStats]:
    """`load_or_compute_pseudo_classes`: the main process computes (or reads) the cache first; the other ranks
    then read it."""
    return main_process_first(load_or_compute_pseudo_classes, *args, **kwargs)
