"""MSDeformAttn (grid_sample): agrees with a naive bilinear loop, honours padding, points vs boxes, autocast."""

import math

import pytest
import torch
from torch import nn

from models.layers.ms_deform_attn import MSDeformAttn

SHAPES = [(4, 5), (2, 3)]


def _bilinear(value: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """value [h, w, D] at normalised (x, y): pixel centres at (i + 0.5) / size, zeros outside."""
    h, w, _ = value.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(value.shape[-1], dtype=torch.float64)
    for dy in (0, 1):
        for dx in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            weight = (1 - abs(px - xi)) * (1 - abs(py - yi))
            if 0 <= xi < w and 0 <= yi < h:
                out += weight * value[yi, xi].double()
    return out


def _naive(attn: MSDeformAttn, query, reference, value, shapes) -> torch.Tensor:
    """A per-query, per-point loop implementing the documented contract: 2-d references (offsets in pixels of
    each level) or 4-d boxes (offsets in half the box's size per point)."""
    batch, num_queries, _ = query.shape
    heads, levels, points = attn.num_heads, attn.num_levels, attn.num_points
    head_dim = attn.d_model // heads
    v = attn.value_proj(value)
    offsets = attn.sampling_offsets(query).view(batch, num_queries, heads, levels, points, 2)
    weights = attn.attention_weights(query).view(batch, num_queries, heads, -1).softmax(-1)
    weights = weights.view(batch, num_queries, heads, levels, points)
    starts = [0, shapes[0][0] * shapes[0][1]]
    out = torch.zeros(batch, num_queries, attn.d_model, dtype=torch.float64)
    for b in range(batch):
        for q in range(num_queries):
            for m in range(heads):
                acc = torch.zeros(head_dim, dtype=torch.float64)
                for lvl, (h, w) in enumerate(shapes):
                    level_value = v[b, starts[lvl] : starts[lvl] + h * w, m * head_dim : (m + 1) * head_dim]
                    level_value = level_value.reshape(h, w, head_dim)
                    if reference.shape[-1] == 2:
                        scale_x, scale_y = 1 / w, 1 / h
                    else:
                        scale_x, scale_y = reference[b, q, lvl, 2:] * 0.5 / points
                    for p in range(points):
                        x = reference[b, q, lvl, 0] + offsets[b, q, m, lvl, p, 0] * scale_x
                        y = reference[b, q, lvl, 1] + offsets[b, q, m, lvl, p, 1] * scale_y
                        acc += weights[b, q, m, lvl, p].double() * _bilinear(level_value, float(x), float(y))
                out[b, q, m * head_dim : (m + 1) * head_dim] = acc
    return attn.output_proj(out.float())


def _random_attn(seed: int) -> MSDeformAttn:
    torch.manual_seed(seed)
    attn = MSDeformAttn(d_model=8, num_levels=2, num_heads=2, num_points=3)
    for p in attn.parameters():
        nn.init.normal_(p, std=0.5)
    return attn


def _inputs(seed: int, batch: int = 2, num_queries: int = 3):
    g = torch.Generator().manual_seed(seed)
    num_values = sum(h * w for h, w in SHAPES)
    query = torch.randn(batch, num_queries, 8, generator=g)
    reference = torch.rand(batch, num_queries, 2, 2, generator=g)
    value = torch.randn(batch, num_values, 8, generator=g)
    return query, reference, value


@pytest.mark.parametrize("reference_dim", [2, 4])
def test_grid_sample_attention_matches_a_naive_bilinear_loop(reference_dim):
    attn = _random_attn(0)
    query, reference, value = _inputs(1)
    if reference_dim == 4:
        # Boxes of random size around the points, some reaching past the map.
        sizes = torch.rand(reference.shape, generator=torch.Generator().manual_seed(8)) * 0.8 + 0.1
        reference = torch.cat([reference, sizes], -1)
    with torch.no_grad():
        fast = attn(query, reference, value, SHAPES, None)
        slow = _naive(attn, query, reference, value, SHAPES)
    assert torch.allclose(fast, slow, atol=1e-5)


def test_padded_values_do_not_change_the_output():
    attn = _random_attn(2)
    query, reference, value = _inputs(3)
    mask = torch.zeros(value.shape[:2], dtype=torch.bool)
    mask[:, 3:7] = True
    changed = value.clone()
    changed[:, 3:7] = 100.0
    with torch.no_grad():
        assert torch.allclose(
            attn(query, reference, value, SHAPES, mask), attn(query, reference, changed, SHAPES, mask)
        )


def test_a_zero_size_box_reference_samples_like_a_point_at_its_centre():
    attn = _random_attn(4)
    query, points, value = _inputs(5)
    boxes = torch.cat([points, torch.zeros_like(points)], -1)
    attn.sampling_offsets.bias.data.zero_()
    attn.sampling_offsets.weight.data.zero_()
    with torch.no_grad():
        assert torch.allclose(attn(query, boxes, value, SHAPES, None), attn(query, points, value, SHAPES, None))


def test_standard_init_spreads_heads_over_directions_with_uniform_weights():
    attn = MSDeformAttn(d_model=16, num_levels=2, num_heads=4, num_points=2)
    offsets = attn.sampling_offsets.bias.view(4, 2, 2, 2)
    assert torch.allclose(offsets[:, 0, 1], 2 * offsets[:, 0, 0])  # point p at distance p + 1
    assert torch.allclose(offsets[:, 0], offsets[:, 1])  # same pattern on every level
    assert len({tuple(d.tolist()) for d in offsets[:, 0, 0]}) == 4  # one direction per head
    assert attn.attention_weights.weight.abs().sum() == 0


def test_runs_under_cpu_autocast_with_float32_sampling():
    attn = _random_attn(6)
    query, reference, value = _inputs(7)
    query.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(query, reference, value, SHAPES, None)
    out.float().sum().backward()
    assert out.shape == (2, 3, 8) and torch.isfinite(out).all()
    assert torch.isfinite(query.grad).all() and query.grad.abs().sum() > 0
