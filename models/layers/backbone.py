"""torchvision ResNet trunk returning the C2-C5 maps a detector asks for."""

from __future__ import annotations

import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from models.layers.tv_detection import IntermediateLayerGetter

_RESNETS = {
    18: torchvision.models.resnet18,
    34: torchvision.models.resnet34,
    50: torchvision.models.resnet50,
    101: torchvision.models.resnet101,
}
# Output channels of layer1..layer4 (C2..C5): basic blocks (18, 34) vs bottlenecks (50, 101).
_CHANNELS = {18: [64, 128, 256, 512], 34: [64, 128, 256, 512], 50: [256, 512, 1024, 2048], 101: [256, 512, 1024, 2048]}
_NORMS = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d}


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without its classifier, returning the maps C_l for l in `out_levels`.

    Args:
        depth: 18, 34, 50 or 101.
        norm: "frozen_bn" (statistics and affine fixed, for pretrained weights) or "bn" (trainable, batch
            statistics, for training from scratch).
        frozen_stages: 0 trains everything; k >= 1 freezes the stem (conv1, bn1) and layer1..layerk
            (no gradients; their BatchNorm stays in eval mode).
        out_levels: pyramid levels to return, from 2 (C2, stride 4) to 5 (C5, stride 32), ascending.

    `body` is a torchvision-named module (conv1, bn1, layer1..layer4), so `body.load_state_dict` accepts a
    torchvision ResNet state dict (its `fc.*` keys aside). forward(x [B, 3, H, W]) returns a list of maps,
    one per out level; `out_channels` and `strides` describe them in the same order.
    """

    def __init__(self, depth: int, norm: str, frozen_stages: int, out_levels: list[int]) -> None:
        super().__init__()
        if depth not in _RESNETS:
            raise ValueError(f"ResNetBackbone: depth {depth!r}; expected one of {sorted(_RESNETS)}")
        if norm not in _NORMS:
            raise ValueError(f"ResNetBackbone: norm {norm!r}; expected one of {sorted(_NORMS)}")
        if not 0 <= frozen_stages <= 4:
            raise ValueError(f"ResNetBackbone: frozen_stages {frozen_stages}; expected 0..4")
        out_levels = [int(level) for level in out_levels]
        if not out_levels or out_levels != sorted(set(out_levels)) or not set(out_levels) <= {2, 3, 4, 5}:
            raise ValueError(f"ResNetBackbone: out_levels {out_levels}; expected ascending levels from 2..5")
        resnet = _RESNETS[depth](weights=None, norm_layer=_NORMS[norm])
        self.body = IntermediateLayerGetter(
            resnet, return_layers={f"layer{level - 1}": str(i) for i, level in enumerate(out_levels)}
        )
        self.out_levels = out_levels
        self.out_channels = [_CHANNELS[depth][level - 2] for level in out_levels]
        self.strides = [2**level for level in out_levels]
        self.frozen_stages = frozen_stages
        for module in self._frozen_modules():
            for p in module.parameters():
                p.requires_grad_(False)

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages == 0:
            return []
        stem = [self.body.conv1, self.body.bn1]
        return stem + [getattr(self.body, f"layer{i}") for i in range(1, self.frozen_stages + 1)]

    def train(self, mode: bool = True) -> ResNetBackbone:
        """Frozen stages keep their BatchNorm statistics fixed, also in training mode."""
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        return list(self.body(x).values())


def pyramid_strides(backbone: ResNetBackbone, num_extra: int) -> list[int]:
    """The backbone levels' strides and `num_extra` coarser ones, each twice the last (a neck's extra levels)."""
    return list(backbone.strides) + [backbone.strides[-1] * 2 ** (i + 1) for i in range(num_extra)]
