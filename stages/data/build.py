"""Datasets and loaders from the `data` config group (synthetic, coco, voc)."""

import random
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

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


def build_dataset(
    data_cfg: DictConfig, split: str, train: bool, seed: int = 0, use_fraction: bool = True
) -> CocoDetection:
    """The `split` ("train" or "val") of the dataset `data_cfg.name` names, with training transforms if
    `train`. Paths are relative to `data_cfg.root` unless absolute; the synthetic dataset is generated first
    if needed. The train split keeps the `data_cfg.fraction` of its images drawn with `data_cfg.subset_seed`
    (null: `seed`; `fraction_indices`) when
    `use_fraction` (the fraction is of the labels: stages that read no labels pass False and see every image);
    then `limit_<split>_images` keeps the first N of those (dataset order: ascending image id)."""
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
    if split == "train" and use_fraction:
        subset_seed = data_cfg.get("subset_seed")
        subset_seed = seed if subset_seed is None else int(subset_seed)
        image_ids = [image_ids[i] for i in fraction_indices(image_ids, data_cfg.fraction, subset_seed)]
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


class EpochSampler(Sampler[int]):
    """The dataset indices one process reads in one epoch: with `shuffle`, a permutation seeded by (seed, epoch),
    the same on every rank; rank r of `world` takes every world-th index (with `drop_last` the tail that does not
    divide evenly is dropped, otherwise the start is repeated to fill it, as DistributedSampler does). `set_epoch`
    also takes `start`: the number of this rank's indices to skip, so that a resumed run continues mid-epoch
    exactly where the killed one stopped, without loading the skipped items."""

    def __init__(self, size: int, shuffle: bool, seed: int, rank: int = 0, world: int = 1, drop_last: bool = False):
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world, self.drop_last = rank, world, drop_last
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        per_rank = self.size // self.world if self.drop_last else -(-self.size // self.world)
        return max(0, per_rank - self.start)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0]))
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        if self.drop_last:
            order = order[: self.size - self.size % self.world]
        elif order and len(order) % self.world:
            order += order[: self.world - len(order) % self.world]
        return iter(order[self.rank :: self.world][self.start :])


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
    """A DataLoader of `(list[Tensor], list[dict])` batches, reproducible from `seed`: the order comes from an
    `EpochSampler` (call `loader.sampler.set_epoch(epoch)` each epoch), the per-worker seeds from a
    torch.Generator seeded with `seed` (mixed with the rank when distributed, so ranks augment differently)."""
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    sampler = EpochSampler(len(dataset), shuffle, seed, rank, world, drop_last)
    generator_seed = seed
    if distributed:
        generator_seed = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
    generator = torch.Generator()
    generator.manual_seed(generator_seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
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
    source: str = "the training set",
) -> DataLoader:
    """A training stage's shuffled loader from `trainer.batch_size` and `trainer.num_workers`, whole batches only.
    A set smaller than one batch per process (`source` names it in the message) stops here with a UserError:
    otherwise a rank could wait forever for its first batch."""
    world = torch.distributed.get_world_size() if distributed else 1
    needed = trainer_cfg.batch_size * world
    if len(dataset) < needed:
        raise UserError(
            f"{source}: {len(dataset)} training items; expected at least trainer.batch_size x processes = "
            f"{trainer_cfg.batch_size} x {world} = {needed}"
        )
    return build_loader(
        dataset,
        batch_size=trainer_cfg.batch_size,
        num_workers=trainer_cfg.num_workers,
        shuffle=True,
        seed=seed,
        distributed=distributed,
        drop_last=True,
        collate_fn=collate_fn,
    )


def describe_train_set(dataset: CocoDetection, data_cfg: DictConfig, use_fraction: bool = True) -> str:
    """The training set's file and the settings that sized it, for messages about its size."""
    sizing = [f"data.fraction={data_cfg.fraction}"] if use_fraction else []
    if data_cfg.get("limit_train_images") is not None:
        sizing.append(f"data.limit_train_images={data_cfg.limit_train_images}")
    return f"{dataset.source}" + (f" (after {', '.join(sizing)})" if sizing else "")


def dataset_categories(dataset: CocoDetection) -> list[dict]:
    """[{"id": the file's category id, "name"}] in contiguous-label order: what a trained class head predicts."""
    return [{"id": cat_id, "name": name} for cat_id, name in zip(dataset.label_to_cat_id, dataset.class_names)]
