import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from stages.data.build import EpochSampler, build_dataset, build_loader, build_train_loader, collate_detection
from stages.data.subsets import fraction_indices
from stages.errors import UserError
from tests.helpers import CONF_DIR

CONF = CONF_DIR / "data"


@pytest.fixture(scope="module")
def synthetic_cfg(tmp_path_factory):
    cfg = OmegaConf.load(CONF / "synthetic.yaml")
    cfg.root = str(tmp_path_factory.mktemp("data") / "synthetic")
    cfg.generator.update(num_train=20, num_val=6, image_size=[40, 56])
    cfg.transforms.train.update(min_sizes=[32, 40], max_size=64)
    cfg.transforms.val.update(min_sizes=[40], max_size=64)
    return cfg


def test_fraction_applies_to_the_train_split_only(synthetic_cfg):
    cfg = synthetic_cfg.copy()
    cfg.fraction = 0.25
    train = build_dataset(cfg, "train", train=True, seed=5)
    val = build_dataset(cfg, "val", train=False, seed=5)
    all_ids = list(range(1, 21))
    assert train.image_ids == [all_ids[i] for i in fraction_indices(all_ids, 0.25, seed=5)]
    assert len(val) == 6
    assert sorted(train.coco.getImgIds()) == train.image_ids


def test_subset_seed_fixes_the_subset_while_the_run_seed_changes(synthetic_cfg):
    cfg = synthetic_cfg.copy()
    cfg.fraction = 0.25
    by_run_seed = {seed: build_dataset(cfg, "train", train=False, seed=seed).image_ids for seed in (1, 2, 3)}
    assert len({tuple(ids) for ids in by_run_seed.values()}) > 1  # null: the run's seed draws the subset
    cfg.subset_seed = 7
    fixed = {seed: build_dataset(cfg, "train", train=False, seed=seed).image_ids for seed in (1, 2, 3)}
    all_ids = list(range(1, 21))
    expected = [all_ids[i] for i in fraction_indices(all_ids, 0.25, seed=7)]
    assert all(ids == expected for ids in fixed.values())


def test_limits_keep_the_first_images_after_the_fraction(synthetic_cfg):
    cfg = synthetic_cfg.copy()
    cfg.update(fraction=0.5, limit_train_images=3, limit_val_images=2)
    full_fraction = build_dataset(OmegaConf.merge(synthetic_cfg, {"fraction": 0.5}), "train", True, seed=1)
    train = build_dataset(cfg, "train", train=True, seed=1)
    assert train.image_ids == full_fraction.image_ids[:3]
    assert build_dataset(cfg, "val", train=False).image_ids == [1, 2]


def test_train_items_use_training_transforms_and_val_items_a_fixed_resize(synthetic_cfg):
    train = build_dataset(synthetic_cfg, "train", train=True)
    val = build_dataset(synthetic_cfg, "val", train=False)
    torch.manual_seed(0)
    assert {min(train[0][0].shape[-2:]) for _ in range(12)} <= {32, 40}
    image, target = val[0]
    assert min(image.shape[-2:]) == 40 and target["size"].tolist() == list(image.shape[-2:])


def test_loader_batches_are_lists_and_reproducible_from_the_seed(synthetic_cfg):
    dataset = build_dataset(synthetic_cfg, "train", train=True)

    def epoch(seed, workers=0):
        torch.manual_seed(seed)  # the trainer seeds the main process; workers derive from the loader's seed
        loader = build_loader(dataset, 4, workers, shuffle=True, seed=seed, distributed=False, drop_last=True)
        return [(tuple(t["image_id"] for t in targets), images[0].sum().item()) for images, targets in loader]

    batches = epoch(3)
    assert len(batches) == 5
    assert batches == epoch(3)
    assert [ids for ids, _ in batches] != [ids for ids, _ in epoch(4)]


def test_loader_workers_are_seeded_from_the_seed(synthetic_cfg):
    dataset = build_dataset(synthetic_cfg, "train", train=True)

    def epoch(seed):
        loader = build_loader(dataset, 2, 1, shuffle=False, seed=seed, distributed=False, drop_last=False)
        return [images[0].sum().item() for images, _ in loader]

    assert epoch(7) == epoch(7)
    assert epoch(7) != epoch(8)  # augmentation differs with the seed


def test_collate_keeps_images_and_targets_as_lists():
    batch = [(torch.zeros(3, 4, 5), {"image_id": 1}), (torch.zeros(3, 6, 2), {"image_id": 2})]
    images, targets = collate_detection(batch)
    assert [tuple(i.shape) for i in images] == [(3, 4, 5), (3, 6, 2)]
    assert [t["image_id"] for t in targets] == [1, 2]


def test_distributed_loader_splits_one_seeded_order_between_ranks(synthetic_cfg, tmp_path):
    dataset = build_dataset(synthetic_cfg, "val", train=False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        loader = build_loader(dataset, 2, 0, shuffle=True, seed=11, distributed=True, drop_last=False)
        assert isinstance(loader.sampler, EpochSampler)
        assert loader.sampler.seed == 11 and loader.sampler.shuffle
        first = [t["image_id"] for _, targets in loader for t in targets]
        again = [t["image_id"] for _, targets in loader for t in targets]
        assert sorted(first) == dataset.image_ids and first == again
    finally:
        dist.destroy_process_group()


def test_epoch_sampler_ranks_partition_the_epoch_and_start_skips_what_was_read():
    ranks = [list(EpochSampler(10, shuffle=True, seed=3, rank=r, world=3, drop_last=True)) for r in range(3)]
    assert sorted(sum(ranks, [])) == sorted(set(sum(ranks, []))) and all(len(r) == 3 for r in ranks)
    whole = EpochSampler(10, shuffle=True, seed=3)
    whole.set_epoch(2)
    order = list(whole)
    whole.set_epoch(2, start=4)
    assert list(whole) == order[4:] and len(whole) == 6
    whole.set_epoch(3)
    assert list(whole) != order  # a new permutation every epoch


def test_unknown_dataset_name_and_unset_root_are_user_errors(synthetic_cfg):
    cfg = synthetic_cfg.copy()
    cfg.name = "imagenet"
    with pytest.raises(UserError, match=r"^data\.name: got 'imagenet'"):
        build_dataset(cfg, "train", train=True)
    coco_cfg = OmegaConf.load(CONF / "coco.yaml")
    with pytest.raises(UserError, match=r"^data\.root: not set"):
        build_dataset(coco_cfg, "train", train=True)


def test_coco_paths_are_relative_to_root_and_missing_folders_are_named(synthetic_cfg, tmp_path):
    cfg = OmegaConf.load(CONF / "coco.yaml")
    cfg.update(root=synthetic_cfg.root, train_images="train", train_json="annotations/train.json")
    assert len(build_dataset(cfg, "train", train=False)) == 20
    cfg.train_images = "train2017"
    with pytest.raises(UserError, match=r"^data\.train_images: .*train2017 is not a folder"):
        build_dataset(cfg, "train", train=False)


def test_train_loader_keeps_whole_batches_and_refuses_a_set_smaller_than_one(synthetic_cfg):
    dataset = build_dataset(synthetic_cfg, "train", train=True)  # 20 images
    trainer = OmegaConf.create({"batch_size": 6, "num_workers": 0})
    assert [len(images) for images, _ in build_train_loader(dataset, trainer, seed=0, distributed=False)] == [6] * 3
    small = torch.utils.data.Subset(dataset, range(4))
    with pytest.raises(
        UserError, match=r"^tiny set: 4 training items; expected at least trainer.batch_size x processes = 6 x 1"
    ):
        build_train_loader(small, trainer, seed=0, distributed=False, source="tiny set")
    with pytest.raises(UserError, match="0 training items"):
        build_train_loader(torch.utils.data.Subset(dataset, []), trainer, seed=0, distributed=False)


def test_label_free_stages_see_every_image_whatever_the_fraction(synthetic_cfg):
    cfg = synthetic_cfg.copy()
    cfg.fraction = 0.25
    assert len(build_dataset(cfg, "train", train=False, use_fraction=False)) == 20
    assert len(build_dataset(cfg, "train", train=False)) == 5
