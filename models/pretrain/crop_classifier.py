"""Supervised backbone pre-training: `CropClassifier` is backbone -> global average pool -> linear.

Its inputs (ground-truth object crops of a detection dataset, or an ImageFolder) come from `stages/data/crops.py`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.pretrain.ssl import encoder_out_dim, pooled_features


class CropClassifier(nn.Module):
    """forward(crops float [B, 3, S, S] in [0, 1], labels int64 [B] | None).

    With labels: {"cls/loss": cross-entropy, "cls/accuracy": top-1 accuracy (a statistic, not a loss term)}.
    Without labels: the logits [B, num_classes]. `encoder` is kept as `encoder` (the same object) so the caller
    can save its weights."""

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        feature_dim: int | None = None,
    ):
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder_out_dim(encoder, feature_dim), num_classes)
        self.register_buffer("pixel_mean", torch.tensor(list(pixel_mean)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(list(pixel_std)).view(1, 3, 1, 1), persistent=False)

    def forward(self, crops: Tensor, labels: Tensor | None = None) -> dict[str, Tensor] | Tensor:
        logits = self.classifier(pooled_features(self.encoder, (crops - self.pixel_mean) / self.pixel_std))
        if labels is None:
            return logits
        accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
        return {"cls/loss": F.cross_entropy(logits, labels), "cls/accuracy": accuracy}
