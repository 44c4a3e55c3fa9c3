"""Co-DETR's multi-scale adapter: encoder memory back to maps, plus the extra levels."""

from __future__ import annotations

import torch

from models.layers.adapter import MultiScaleAdapter


def _memory(shapes: list[tuple[int, int]], channels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    spatial_shapes = torch.tensor(shapes)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    memory = torch.randn(2, int(sizes.sum()), channels)
    return memory, spatial_shapes, level_start_index


def test_multi_scale_adapter_splits_memory_and_adds_one_stride2_level():
    torch.manual_seed(0)
    memory, shapes, starts = _memory([(8, 10), (4, 5), (2, 3)], channels=16)
    adapter = MultiScaleAdapter(d_model=16, num_groups=4, num_levels_down=1, num_levels_up=0)
    maps = adapter(memory, shapes, starts)
    assert [tuple(m.shape) for m in maps] == [(2, 16, 8, 10), (2, 16, 4, 5), (2, 16, 2, 3), (2, 16, 1, 2)]
    for level, (h, w) in enumerate(shapes.tolist()):
        start = int(starts[level])
        expected = memory[:, start : start + h * w].transpose(1, 2).reshape(2, 16, h, w)
        assert torch.equal(maps[level], expected)
    assert adapter.output_strides([8, 16, 32]) == [8, 16, 32, 64]


def test_single_scale_adapter_builds_a_five_level_pyramid():
    torch.manual_seed(0)
    memory, shapes, starts = _memory([(4, 6)], channels=16)
    adapter = MultiScaleAdapter(d_model=16, num_groups=4, num_levels_down=2, num_levels_up=2)
    maps = adapter(memory, shapes, starts)
    assert [tuple(m.shape[-2:]) for m in maps] == [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
    assert torch.equal(maps[2], memory.transpose(1, 2).reshape(2, 16, 4, 6))
    assert adapter.output_strides([32]) == [8, 16, 32, 64, 128]
    sum(m.square().mean() for m in maps).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
