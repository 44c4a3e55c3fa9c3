"""Self-supervised pre-training of a backbone on unlabelled images: MoCo v3 (the default) and BYOL. Their two-crop
augmentation and the view datasets (whole images, or selective-search proposal crops) are in
`stages/data/ssl_views.py`.

Both methods share one body (`MomentumSSL`): an online network (encoder -> global average pool -> projector MLP
-> predictor MLP) and a momentum target network (an EMA copy of encoder + projector) run on both views in one
pass; the target's momentum `tau` rises from `base_momentum` to `final_momentum` on a cosine schedule over
training, and the train loop calls `update_target(progress)` after every optimiser step. They differ only in
the loss between the online predictions p1, p2 and the target projections z1, z2:

- BYOL (Grill et al., 2020): normalised MSE `2 - 2 cos(p, z)` to the other view's target, symmetrised. No
  negatives. On this repository's small synthetic images its features collapse onto fewer and fewer directions
  as it trains (docs/results.md).
- MoCo v3 (Chen, Xie and He, 2021): InfoNCE with temperature T between p1 and all z2 of the batch (the positive
  is the same image's), symmetrised and scaled by 2T: `2T [CE(p1 z2^T / T) + CE(p2 z1^T / T)]`. The negatives
  are the other images of the batch (of every process under DDP), so no queue is needed. It is the method that
  improved with training here, on proposal crops.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def pooled_features(encoder: nn.Module, images: Tensor) -> Tensor:
    """[B, C] global-average-pooled last feature map of `encoder(images)`.

    The encoder may return a map [B, C, h, w], an already pooled [B, C], or a dict / list of maps whose last
    entry is the deepest (C5), as `models.layers.backbone.ResNetBackbone` does."""
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
    """The projector / predictor: Linear -> BatchNorm1d -> ReLU -> Linear (BYOL's; MoCo v3's ResNet MLPs have
    one more hidden layer and a BatchNorm after the last Linear)."""
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


class MomentumSSL(nn.Module):
    """Online and momentum networks around a given encoder; `encoder` is kept as `online_encoder` (the same
    object) so the caller can save its weights after training. Subclasses define `loss(p1, p2, z1, z2)`.

    forward(view1, view2): two augmentations of the same images, float [B, 3, H, W] in [0, 1] (normalised
    here with `pixel_mean` / `pixel_std`); returns {"ssl/loss": the method's loss}. Batch size must be at least
    2 in training (BatchNorm in the MLPs).
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
        return {"ssl/loss": self.loss(p1, p2, z1, z2)}

    def loss(self, p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define loss(p1, p2, z1, z2)")

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


class BYOL(MomentumSSL):
    """BYOL: symmetric normalised MSE between each view's prediction and the other view's target projection."""

    def loss(self, p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
        return normalized_mse(p1, z2) + normalized_mse(p2, z1)


def gather_batch(tensor: Tensor) -> tuple[Tensor, int]:
    """(the rows of every process concatenated in rank order, offset of this process's rows in it). No gradient
    flows through the gather: it is used on the target network's projections only."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor, 0
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts), dist.get_rank() * tensor.shape[0]


def info_nce(queries: Tensor, keys: Tensor, temperature: float) -> Tensor:
    """MoCo v3's contrastive loss: cross-entropy of the cosine similarities / T of each query to every key of the
    (gathered) batch, the positive being the key of the same image; scaled by 2T as in the paper."""
    queries = F.normalize(queries, dim=1)
    keys, offset = gather_batch(F.normalize(keys.detach(), dim=1))
    logits = queries @ keys.T / temperature
    labels = torch.arange(queries.shape[0], device=queries.device) + offset
    return 2 * temperature * F.cross_entropy(logits, labels)


class MoCoV3(MomentumSSL):
    """MoCo v3: InfoNCE between each view's prediction and the other view's target projections of the batch."""

    def __init__(self, encoder: nn.Module, temperature: float, **kwargs):
        super().__init__(encoder, **kwargs)
        if temperature <= 0:
            raise ValueError(f"temperature: expected > 0, got {temperature}")
        self.temperature = float(temperature)

    def loss(self, p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
        return info_nce(p1, z2, self.temperature) + info_nce(p2, z1, self.temperature)
