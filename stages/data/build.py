"""Datasets and loaders from the `data` config group (synthetic, coco, voc)."""

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from stages.data.coco import CocoDetection
from stages.data.subsets import fraction_indices
from stages.data.synthetic import ensure_synthetic
from stages.data.transforms import build_transforms
from stages.data.voc import VOCDetection
from stages.errors import UserError

DATASETS = ("synthetic", "coco", "voc")
SPLITS = ("train", "val")


def _check_limit(data_cfg: DictConfig, key: str) -> int | None:
    limit = data_cfg.get(key)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"data.{key}: got {limit!r}; expected a positive int or null")
    return limit


def build_dataset(data_cfg: DictConfig, split: str, train: bool, seed: int = 0) -> CocoDetection:
    """The `split` ("train" or "val") of the dataset `data_cfg.name` names, with training transforms if
    `train`. Paths are relative to `data_cfg.root` unless absolute; the synthetic dataset is generated first
    if needed. The train split keeps the seeded `data_cfg.fraction` of its images (`fraction_indices`); then
    `limit_<split>_images` keeps the first N of those (dataset order: ascending image id)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}; expected one of {SPLITS}")
    if data_cfg.name not in DATASETS:
        raise UserError(f"data.name: got {data_cfg.name!r}; expected one of {DATASETS}")
    if OmegaConf.is_missing(data_cfg, "root"):
        raise UserError(f"data.root: not set; expected data.root=/path/to/the/{data_cfg.name}/dataset")
    transforms = build_transforms(data_cfg.transforms, train)
    root = Path(str(data_cfg.root))
    if data_cfg.name == "voc":
        dataset: CocoDetection = VOCDetection(
            root, data_cfg[f"{split}_sets"], list(data_cfg.classes), data_cfg.keep_difficult, transforms
        )
    else:
        if data_cfg.name == "synthetic":
            ensure_synthetic(data_cfg)
        elif not root.is_dir():
            raise UserError(f"data.root: {root} is not a folder; expected the dataset's root folder")
        image_dir = root / str(data_cfg[f"{split}_images"])
        if not image_dir.is_dir():
            raise UserError(f"data.{split}_images: {image_dir} is not a folder; expected the {split} images")
        dataset = CocoDetection(image_dir, root / str(data_cfg[f"{split}_json"]), transforms)
    image_ids = dataset.image_ids
    if split == "train":
        image_ids = [image_ids[i] for i in fraction_indices(image_ids, data_cfg.fraction, seed)]
    limit = _check_limit(data_cfg, f"limit_{split}_images")
    if limit is not None:
        image_ids = image_ids[:limit]
    if len(image_ids) < len(dataset):
        dataset = dataset.subset(image_ids)
    return dataset


def collate_detection(batch: list[tuple[Tensor, dict]]) -> tuple[list[Tensor], list[dict]]:
    """Images and targets as two lists (sizes differ; the model pads)."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


def _seed_worker(worker_id: int) -> None:
    # DataLoader seeds each worker's torch RNG from the loader's seeded generator (base seed + worker id);
    # numpy and random follow it so any library a transform uses is reproducible too.
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    shuffle: bool,
    seed: int,
    distributed: bool,
    drop_last: bool,
    collate_fn: Callable[[list], tuple] = collate_detection,
) -> DataLoader:
    """A DataLoader of `(list[Tensor], list[dict])` batches, reproducible from `seed`: the shuffle order and
    the per-worker seeds come from a torch.Generator seeded with `seed` (mixed with the rank when
    distributed, so ranks augment differently); when `distributed`, a DistributedSampler(shuffle, seed)
    splits the data between ranks and the caller calls `loader.sampler.set_epoch(epoch)` each epoch."""
    sampler = None
    generator_seed = seed
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
        generator_seed = int(np.random.SeedSequence([seed, torch.distributed.get_rank()]).generate_state(1)[0])
    generator = torch.Generator()
    generator.manual_seed(generator_seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
        generator=generator,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
    )


def build_train_loader(
    dataset: Dataset,
    trainer_cfg: DictConfig,
    seed: int,
    distributed: bool,
    collate_fn: Callable[[list], tuple] = collate_detection,
) -> DataLoader:
    """A training stage's shuffled loader from `trainer.batch_size` and `trainer.num_workers`: whole batches
    only, unless the dataset is smaller than one batch (a tiny data fraction still trains)."""
    return build_loader(
        dataset,
        batch_size=trainer_cfg.batch_size,
        num_workers=trainer_cfg.num_workers,
        shuffle=True,
        seed=seed,
        distributed=distributed,
        drop_last=len(dataset) >= trainer_cfg.batch_size,
        collate_fn=collate_fn,
    )
