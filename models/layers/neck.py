"""Channel mapper: project backbone maps to a common width and add extra stride-2 levels."""

from __future__ import annotations

from torch import Tensor, nn


def _conv_gn(in_channels: int, out_channels: int, kernel_size: int, stride: int, num_groups: int) -> nn.Sequential:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2)
    nn.init.xavier_uniform_(conv.weight)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(conv, nn.GroupNorm(num_groups, out_channels))


class ChannelMapper(nn.Module):
    """Deformable-DETR's input projection.

    Each input level gets a 1x1 conv + GroupNorm to `out_channels`. If `num_outs` exceeds the number of inputs,
    extra levels are appended, each a 3x3 stride-2 conv + GroupNorm: the first reads the last *input* map
    (e.g. C5), the next ones read the previous extra level. forward(list of maps) -> list of `num_outs` maps,
    strides doubling after the last input's stride.
    """

    def __init__(self, in_channels: list[int], out_channels: int, num_outs: int, num_groups: int) -> None:
        super().__init__()
        in_channels = list(in_channels)
        if num_outs < len(in_channels):
            raise ValueError(f"ChannelMapper: num_outs {num_outs} < {len(in_channels)} input levels")
        if out_channels % num_groups:
            raise ValueError(f"ChannelMapper: out_channels {out_channels} not divisible by num_groups {num_groups}")
        self.lateral = nn.ModuleList(_conv_gn(c, out_channels, 1, 1, num_groups) for c in in_channels)
        extra_in = [in_channels[-1]] + [out_channels] * (num_outs - len(in_channels) - 1)
        self.extra = nn.ModuleList(
            _conv_gn(c, out_channels, 3, 2, num_groups) for c in extra_in[: num_outs - len(in_channels)]
        )
        self.out_channels = out_channels
        self.num_outs = num_outs

    def forward(self, inputs: list[Tensor]) -> list[Tensor]:
        if len(inputs) != len(self.lateral):
            raise ValueError(f"ChannelMapper: got {len(inputs)} maps; expected {len(self.lateral)}")
        outs = [proj(x) for proj, x in zip(self.lateral, inputs)]
        source = inputs[-1]
        for conv in self.extra:
            source = conv(source)
            outs.append(source)
        return outs
