"""Quality of an image-domain backbone: k-NN accuracy on ground-truth object crops of the synthetic dataset.

    python benchmarks/knn_probe.py --checkpoint RUN/image_pretrain [--checkpoint ...] [--grayscale] [--linear]
        [--recompute-bn] [overrides ...]

Every backbone (random initialisation, then each checkpoint: a file or a stage directory) embeds the train and
val crops (global-average-pooled C5, L2-normalised); each val crop takes the label of a similarity-weighted vote
of its k nearest train crops. With --linear, also a linear probe: L2-regularised logistic regression on the
standardised features, fitted with L-BFGS on the train crops. Prints one row per backbone: top-1 accuracy and the
majority-class baseline, and the effective rank of the val features (`effective_rank`). With --recompute-bn, every
backbone's BatchNorm statistics are first re-estimated on the train crops (grayscale ones with --grayscale).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from models.pretrain.ssl import pooled_features
from stages.data.build import build_dataset
from stages.data.crops import GroundTruthCrops
from stages.engine.checkpoint import load_into
from stages.image_pretrain import BackboneOnly

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"


def backbone_input(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, grayscale: bool) -> torch.Tensor:
    """Crops in [0, 1] -> the normalised backbone input, in grayscale (still 3 channels) when `grayscale`."""
    if grayscale:
        # The classes differ in shape only: a grayscale probe shows whether colour is what a backbone matches.
        images = images.mean(1, keepdim=True).expand_as(images)
    return (images - mean) / std


@torch.no_grad()
def embed(
    backbone: torch.nn.Module,
    crops: GroundTruthCrops,
    mean: torch.Tensor,
    std: torch.Tensor,
    batch: int,
    grayscale: bool = False,
):
    backbone.eval()
    feats, labels = [], []
    for images, targets in DataLoader(crops, batch_size=batch):
        feats.append(F.normalize(pooled_features(backbone, backbone_input(images, mean, std, grayscale)), dim=1))
        labels.append(targets)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def recompute_batchnorm(
    backbone: torch.nn.Module, crops: GroundTruthCrops, mean, std, batch: int, grayscale: bool = False
) -> None:
    """Replace every BatchNorm's running statistics with their average over the batches of `crops` (precise BN),
    so that a backbone is probed with statistics of the probe's own inputs instead of those of its training views
    (or, at random initialisation, the identity: mean 0, variance 1). The inputs are those `embed` gives it."""
    norms = [m for m in backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over all batches
    backbone.train()
    for images, _ in DataLoader(crops, batch_size=batch):
        backbone(backbone_input(images, mean, std, grayscale))
    backbone.eval()


def knn_accuracy(train_x, train_y, val_x, val_y, k: int, num_classes: int, temperature: float) -> float:
    similarity = val_x @ train_x.T
    top, index = similarity.topk(k, dim=1)
    votes = torch.zeros(len(val_x), num_classes).scatter_add_(1, train_y[index], (top / temperature).exp())
    return float((votes.argmax(1) == val_y).float().mean()) * 100


def linear_probe_accuracy(train_x, train_y, val_x, val_y, num_classes: int, weight_decay: float, steps: int) -> float:
    """Top-1 % of a logistic regression on features standardised with the train crops' statistics."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    weight = torch.zeros(train_x.shape[1], num_classes, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(train_x @ weight + bias, train_y) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float(((val_x @ weight + bias).argmax(1) == val_y).float().mean()) * 100


def effective_rank(features: torch.Tensor) -> float:
    """exp(entropy) of the normalised singular values of the centred [N, C] feature matrix (Roy & Vetterli,
    2007): 1 when every feature lies on one line, C when they spread evenly over all C directions. A backbone
    whose features collapse onto a few directions shows it here before any probe does."""
    singular = torch.linalg.svdvals(features - features.mean(0))
    p = singular / singular.sum()
    return float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", default=[], help="image_pretrain checkpoint or stage dir")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--crop-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grayscale", action="store_true", help="probe on grayscale crops (colour removed)")
    parser.add_argument("--linear", action="store_true", help="also fit and report a linear probe")
    parser.add_argument(
        "--recompute-bn", action="store_true", help="re-estimate BatchNorm statistics on the train crops first"
    )
    parser.add_argument("--linear-weight-decay", type=float, default=1e-3)
    parser.add_argument("--linear-steps", type=int, default=500, help="L-BFGS iterations of the linear probe")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. paths.data_dir=/tmp/data")
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["paths.run_dir=/tmp/knn_probe", *args.overrides])
    crops = {
        split: GroundTruthCrops(build_dataset(cfg.data, split, train=False), args.crop_size, 0.1, 4, 0.0)
        for split in ("train", "val")
    }
    num_classes = crops["train"].num_classes
    mean = torch.tensor(list(cfg.model.detector.pixel_mean)).view(1, 3, 1, 1)
    std = torch.tensor(list(cfg.model.detector.pixel_std)).view(1, 3, 1, 1)
    val_labels = torch.tensor([label for _, _, label in crops["val"].items])
    majority = max(int(val_labels.eq(c).sum()) for c in range(num_classes)) / len(val_labels)
    rows = []
    for source in [None, *args.checkpoint]:
        torch.manual_seed(args.seed)
        backbone = instantiate(cfg.model.detector.backbone)
        if source is not None:
            load_into(BackboneOnly(backbone), source)
        if args.recompute_bn:
            recompute_batchnorm(backbone, crops["train"], mean, std, args.batch, args.grayscale)
        train_x, train_y = embed(backbone, crops["train"], mean, std, args.batch, args.grayscale)
        val_x, val_y = embed(backbone, crops["val"], mean, std, args.batch, args.grayscale)
        accuracy = knn_accuracy(train_x, train_y, val_x, val_y, args.k, num_classes, args.temperature)
        linear = (
            linear_probe_accuracy(
                train_x, train_y, val_x, val_y, num_classes, args.linear_weight_decay, args.linear_steps
            )
            if args.linear
            else None
        )
        rows.append((source or "random init", accuracy, linear, effective_rank(val_x)))
    colour = "grayscale" if args.grayscale else "colour"
    bn = ", BatchNorm statistics re-estimated on the train crops" if args.recompute_bn else ""
    print(
        f"\n{len(crops['train'])} train / {len(crops['val'])} val {colour} crops, {num_classes} classes, k={args.k}{bn}"
    )
    print(f"majority-class baseline: {100 * majority:.1f}%")
    linear_header = f"{'linear top-1 %':>16}" if args.linear else ""
    print(f"{'backbone':<60}{'k-NN top-1 %':>14}{linear_header}{'val eff. rank':>15}")
    for name, accuracy, linear, rank in rows:
        linear_cell = f"{linear:>16.1f}" if linear is not None else ""
        print(f"{str(name)[-60:]:<60}{accuracy:>14.1f}{linear_cell}{rank:>15.1f}")


if __name__ == "__main__":
    main()
