"""Pseudo-classes of the proposals: k-means, and the cluster ids' cache beside the proposals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from stages.data import pseudo_classes as pseudo_module
from stages.data.pseudo_classes import kmeans, load_or_compute_pseudo_classes
from tests.helpers import compose_config
from tests.helpers.tiny_detr import tiny_detr

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_CLUSTERS = 3


class TinyImages:
    """Three 64 px images of noise with a bright red and a bright blue square: the dataset interface the
    pseudo-classes read (`image_ids`, `load_image`, `__len__`)."""

    image_ids = [11, 12, 13]
    source = "tiny"

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.images = []
        for _ in self.image_ids:
            image = (rng.random((64, 64, 3)) * 80).astype(np.uint8)
            image[8:30, 8:30] = (230, 20, 20)
            image[34:60, 30:56] = (20, 20, 230)
            self.images.append(image)

    def __len__(self) -> int:
        return len(self.images)

    def load_image(self, index: int) -> np.ndarray:
        return self.images[index]


PROPOSALS = {
    image_id: np.array(
        [[8, 8, 30, 30], [34, 30, 56, 60], [0, 0, 64, 64], [40, 0, 64, 24], [6, 6, 32, 32]], dtype=np.float32
    )
    for image_id in TinyImages.image_ids
}


@pytest.fixture(scope="module")
def compute():
    """`load_or_compute_pseudo_classes` on TinyImages with a tiny DETR's backbone and stage.pseudo_classes of
    box_pretrain (NUM_CLUSTERS clusters), `changes` replacing some of its keys."""
    base = OmegaConf.to_container(
        compose_config(["experiment=smoke", "stage=box_pretrain"]).stage.pseudo_classes, resolve=True
    )
    detector = tiny_detr()

    def run(cache_dir: Path, seed: int = 0, proposals_key: str = "p" * 64, init: str = "a", **changes):
        return load_or_compute_pseudo_classes(
            TinyImages(),
            PROPOSALS,
            lambda: detector,
            {**base, "num_clusters": NUM_CLUSTERS, **changes},
            seed,
            cache_dir,
            proposals_key,
            {"init": {"sha256": init}},
        )

    return run


def test_kmeans_separates_clear_groups_and_repeats_for_a_seed():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([c + 0.1 * torch.randn(20, 2, generator=g) for c in centres])
    ids = kmeans(points, 3, iters=20, seed=0)
    groups = ids.view(3, 20)
    assert all(len(set(row.tolist())) == 1 for row in groups) and len(set(groups[:, 0].tolist())) == 3
    assert torch.equal(kmeans(points, 3, iters=20, seed=0), ids)
    with pytest.raises(ValueError, match="4 points for 5 clusters"):
        kmeans(points[:4], 5, iters=20, seed=0)


def test_pseudo_classes_are_stable_for_a_seed(tmp_path, compute):
    first, stats = compute(tmp_path / "a")
    again, _ = compute(tmp_path / "b")
    assert list(first) == TinyImages.image_ids
    for image_id in first:
        assert first[image_id].dtype == np.int64 and len(first[image_id]) == len(PROPOSALS[image_id])
        np.testing.assert_array_equal(first[image_id], again[image_id])
    assert stats.num_proposals == 15 and sum(stats.cluster_sizes) == 15 and len(stats.cluster_sizes) == NUM_CLUSTERS
    assert np.concatenate(list(first.values())).max() < NUM_CLUSTERS


def test_pseudo_classes_are_cached_and_read_back_without_recomputing(tmp_path, monkeypatch, compute):
    first, stats = compute(tmp_path)
    assert not stats.cache_hit
    cache = Path(stats.cache_path)
    assert cache.parent == tmp_path and cache.is_file()
    stored = json.loads(cache.read_text())
    assert stored["labels"] == [first[image_id].tolist() for image_id in TinyImages.image_ids]

    def recompute(*args, **kwargs):
        raise AssertionError("pseudo-classes recomputed despite a matching cache")

    monkeypatch.setattr(pseudo_module, "proposal_features", recompute)
    again, stats = compute(tmp_path)
    assert stats.cache_hit and Path(stats.cache_path) == cache
    for image_id in first:
        np.testing.assert_array_equal(first[image_id], again[image_id])


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 1},
        {"proposals_key": "q" * 64},
        {"init": "another checkpoint"},
        {"kmeans_iters": 3},
        {"roi_output_size": 2},
        {"num_clusters": 2},
    ],
)
def test_pseudo_classes_are_recomputed_when_a_key_input_changes(tmp_path, compute, change):
    _, base = compute(tmp_path)
    _, changed = compute(tmp_path, **change)
    assert not changed.cache_hit and changed.cache_path != base.cache_path
