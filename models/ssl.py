"""BYOL self-supervised pre-training of a backbone on unlabelled images, and its two-crop augmentation.

BYOL (Grill et al., 2020) rather than MoCo: BYOL has no negatives, so it needs neither MoCo's large queue of
negative keys nor SimCLR-style large batches. That suits this pipeline's small CPU batches (2-16 images), where a
contrastive loss would see almost no negatives per step.

Method: an online network (encoder -> global average pool -> projector MLP -> predictor MLP) regresses the
projection of a momentum target network (an EMA copy of encoder + projector) computed on the other view. The loss
is the normalised MSE `2 - 2 cos(p, z)`, symmetrised over the two views. The target's momentum `tau` rises from
`base_momentum` to `final_momentum` on a cosine schedule over training; the train loop calls
`update_target(progress)` after every optimiser step.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision.transforms import v2


def pooled_features(encoder: nn.Module, images: Tensor) -> Tensor:
    """[B, C] global-average-pooled last feature map of `encoder(images)`.

    The encoder may return a map [B, C, h, w], an already pooled [B, C], or a dict / list of maps whose last
    entry is the deepest (C5), as `models.backbone.ResNetBackbone` does."""
    out = encoder(images)
    if isinstance(out, dict):
        out = list(out.values())[-1]
    elif isinstance(out, list | tuple):
        out = out[-1]
    return out.mean(dim=(2, 3)) if out.dim() == 4 else out


def encoder_out_dim(encoder: nn.Module, feature_dim: int | None) -> int:
    """`feature_dim`, or else the encoder's `out_channels` (last entry when it lists one per level)."""
    if feature_dim is not None:
        return int(feature_dim)
    channels = getattr(encoder, "out_channels", None)
    if isinstance(channels, dict):
        channels = list(channels.values())
    if isinstance(channels, Sequence) and channels:
        return int(channels[-1])
    if isinstance(channels, int):
        return channels
    raise ValueError(f"{type(encoder).__name__} has no out_channels; pass feature_dim")


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """BYOL's projector / predictor: Linear -> BatchNorm1d -> ReLU -> Linear."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
    )


def normalized_mse(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean over the batch of ||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z)."""
    return (2 - 2 * F.cosine_similarity(prediction, target.detach(), dim=-1)).mean()


def cosine_momentum(progress: float, base: float, final: float) -> float:
    """BYOL's schedule: `final - (final - base) * (cos(pi * progress) + 1) / 2`; base at 0, final at 1."""
    progress = min(max(float(progress), 0.0), 1.0)
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2


class BYOL(nn.Module):
    """BYOL around a given encoder; `encoder` is kept as `online_encoder` (the same object) so the caller can
    save its weights after training.

    forward(view1, view2): two augmentations of the same images, float [B, 3, H, W] in [0, 1] (normalised
    here with `pixel_mean` / `pixel_std`); returns {"ssl/loss": symmetric normalised MSE}. Batch size must be
    at least 2 in training (BatchNorm in the MLPs).
    """

    def __init__(
        self,
        encoder: nn.Module,
        projector_hidden_dim: int,
        projector_out_dim: int,
        predictor_hidden_dim: int,
        base_momentum: float,
        final_momentum: float,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        feature_dim: int | None = None,
    ):
        super().__init__()
        if not 0.0 <= base_momentum <= final_momentum <= 1.0:
            raise ValueError(f"momentum: expected 0 <= base ({base_momentum}) <= final ({final_momentum}) <= 1")
        in_dim = encoder_out_dim(encoder, feature_dim)
        self.base_momentum = float(base_momentum)
        self.final_momentum = float(final_momentum)
        self.online_encoder = encoder
        self.projector = mlp(in_dim, projector_hidden_dim, projector_out_dim)
        self.predictor = mlp(projector_out_dim, predictor_hidden_dim, projector_out_dim)
        # The target starts as an exact copy and only ever moves by the EMA in update_target.
        self.target_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.register_buffer("pixel_mean", torch.tensor(list(pixel_mean)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(list(pixel_std)).view(1, 3, 1, 1), persistent=False)

    def forward(self, view1: Tensor, view2: Tensor) -> dict[str, Tensor]:
        # Both views in one pass: half the calls, and BatchNorm statistics over 2B samples, which matters at the
        # small batch sizes this runs with.
        images = (torch.cat([view1, view2]) - self.pixel_mean) / self.pixel_std
        predictions = self.predictor(self.projector(pooled_features(self.online_encoder, images)))
        with torch.no_grad():
            targets = self.target_projector(pooled_features(self.target_encoder, images))
        p1, p2 = predictions.chunk(2)
        z1, z2 = targets.chunk(2)
        return {"ssl/loss": normalized_mse(p1, z2) + normalized_mse(p2, z1)}

    def momentum(self, progress: float) -> float:
        return cosine_momentum(progress, self.base_momentum, self.final_momentum)

    @torch.no_grad()
    def update_target(self, progress: float) -> float:
        """target <- tau * target + (1 - tau) * online for every parameter of encoder and projector, with tau
        from the cosine schedule at `progress` (fraction of training done, 0..1). Returns tau.

        Buffers (BatchNorm running statistics) are not averaged: the target runs in the same mode as the online
        network, so in training it normalises with batch statistics and keeps its own running estimates."""
        tau = self.momentum(progress)
        pairs = ((self.online_encoder, self.target_encoder), (self.projector, self.target_projector))
        for online, target in pairs:
            for p_online, p_target in zip(online.parameters(), target.parameters(), strict=True):
                p_target.lerp_(p_online.detach(), 1.0 - tau)
        return tau


def image_to_chw(image: np.ndarray | Tensor) -> Tensor:
    """HxWx3 uint8 numpy (a dataset's `load_image`) or a CHW tensor -> CHW tensor."""
    if isinstance(image, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    return image


class TwoCropTransform:
    """BYOL's asymmetric augmentation: one image -> two float [3, crop_size, crop_size] views in [0, 1].

    Each view: RandomResizedCrop(scale, ratio) -> horizontal flip -> colour jitter (with `jitter_prob`) ->
    grayscale -> Gaussian blur (probability per view from `blur_probs`, kernel `blur_kernel_fraction` of the crop)
    -> solarize (probability per view from `solarize_probs`). BYOL's published values: blur (1.0, 0.1),
    solarize (0.0, 0.2), jitter 0.8 with (0.4, 0.4, 0.2, 0.1), grayscale 0.2."""

    def __init__(
        self,
        crop_size: int,
        scale: Sequence[float],
        ratio: Sequence[float],
        flip_prob: float,
        jitter_prob: float,
        brightness: float,
        contrast: float,
        saturation: float,
        hue: float,
        grayscale_prob: float,
        blur_probs: Sequence[float],
        blur_sigma: Sequence[float],
        blur_kernel_fraction: float,
        solarize_probs: Sequence[float],
        solarize_threshold: float,
    ):
        if len(blur_probs) != 2 or len(solarize_probs) != 2:
            raise ValueError(f"blur_probs {blur_probs} and solarize_probs {solarize_probs}: expected one per view")
        kernel = max(3, int(round(blur_kernel_fraction * crop_size)) // 2 * 2 + 1)  # odd, as blur requires
        self.views = [
            v2.Compose(
                [
                    v2.RandomResizedCrop(crop_size, scale=tuple(scale), ratio=tuple(ratio), antialias=True),
                    v2.RandomHorizontalFlip(flip_prob),
                    v2.ToDtype(torch.float32, scale=True),
                    v2.RandomApply([v2.ColorJitter(brightness, contrast, saturation, hue)], p=jitter_prob),
                    v2.RandomGrayscale(grayscale_prob),
                    v2.RandomApply([v2.GaussianBlur(kernel, sigma=tuple(blur_sigma))], p=blur_p),
                    v2.RandomSolarize(solarize_threshold, p=solarize_p),
                ]
            )
            for blur_p, solarize_p in zip(blur_probs, solarize_probs, strict=True)
        ]

    def __call__(self, image: np.ndarray | Tensor) -> tuple[Tensor, Tensor]:
        image = image_to_chw(image)
        return self.views[0](image), self.views[1](image)


class TwoViewDataset(Dataset):
    """The images of `source` (anything with `__len__` and `load_image(index) -> HxWx3 uint8`, e.g. a detection
    dataset; labels are never read) as (view1, view2) pairs; the default collate stacks them into batches."""

    def __init__(self, source, transform: TwoCropTransform):
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.transform(self.source.load_image(index))
