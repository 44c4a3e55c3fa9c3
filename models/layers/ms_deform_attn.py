"""Multi-scale deformable attention (Deformable-DETR).

Each query attends to `num_points` sampled locations per level and head, placed around its reference point
by learned offsets and mixed by learned weights (softmax over levels x points).

The sampling has two backends behind one call: `F.grid_sample` here ("pytorch", runs anywhere) and the Triton
kernels of `models/layers/ms_deform_attn_triton.py` ("triton", CUDA; Triton's interpreter runs them on CPU when
TRITON_INTERPRET=1 is set before triton is imported). "auto" takes Triton for CUDA tensors when triton imports,
else grid_sample.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.layers.image_list import size_table


def ms_deform_attn_sample(
    value: Tensor, spatial_shapes: list[tuple[int, int]], locations: Tensor, weights: Tensor
) -> Tensor:
    """Bilinear sampling of every level, weighted sum over levels x points.

    value [B, S, H, Dh] (the levels flattened one after another), locations [B, Q, H, L, P, 2] as (x, y) in
    [0, 1] of each level's padded map, weights [B, Q, H, L, P] -> [B, Q, H * Dh]. Locations outside the map
    read zeros. Computed in float32 (also under autocast); returned in value's dtype.
    """
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    out_dtype = value.dtype
    # Each level's operands are made contiguous once, up front, and each level's weighted sum is added to the
    # output as soon as it is sampled: stacking the levels' samples ([B*H, Dh, Q, L, P], the step's largest
    # tensor) and reducing across a strided level axis cost more than the sampling itself on CPU.
    # [B, S, H, Dh] -> [B*H, Dh, S]: one copy, then each level is a view.
    value = value.float().permute(0, 2, 3, 1).reshape(batch * heads, head_dim, -1)
    per_level = value.split([h * w for h, w in spatial_shapes], dim=-1)
    # Points before queries, so that the sum over points runs along whole rows of queries (a sum over a short
    # innermost axis is the slowest reduction on CPU).
    # [B, Q, H, L, P, 2] -> [L, B*H, P, Q, 2] in grid_sample's [-1, 1].
    grids = (2 * locations.float() - 1).permute(3, 0, 2, 4, 1, 5).reshape(levels, batch * heads, points, queries, 2)
    # [B, Q, H, L, P] -> [L, B*H, 1, P, Q], to broadcast over Dh.
    level_weights = weights.float().permute(3, 0, 2, 4, 1).reshape(levels, batch * heads, 1, points, queries)
    out = value.new_zeros(())
    for level, (h, w) in enumerate(spatial_shapes):
        v = per_level[level].view(batch * heads, head_dim, h, w)
        sampled = F.grid_sample(v, grids[level], mode="bilinear", padding_mode="zeros", align_corners=False)
        out = out + (sampled * level_weights[level]).sum(2)  # [B*H, Dh, P, Q] -> [B*H, Dh, Q]
    return out.view(batch, heads * head_dim, queries).transpose(1, 2).to(out_dtype)


MSDA_BACKENDS = ("auto", "pytorch", "triton")


@functools.cache
def _triton_sampler() -> Callable[..., Tensor] | ImportError:
    """`ms_deform_attn_triton`, or why it does not import; imported on first use, as only CUDA runs need triton."""
    try:
        from models.layers.ms_deform_attn_triton import ms_deform_attn_triton
    except ImportError as err:
        return err
    return ms_deform_attn_triton


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend ("pytorch" or "triton") that `backend` runs for values on `device`."""
    if backend not in MSDA_BACKENDS:
        raise ValueError(f"MSDeformAttn: unknown backend {backend!r}; expected one of {', '.join(MSDA_BACKENDS)}")
    if backend == "auto":
        # The interpreter is for testing the kernel, never a choice on CPU: grid_sample is far faster there.
        return "triton" if device.type == "cuda" and not isinstance(_triton_sampler(), ImportError) else "pytorch"
    return backend


class MSDeformAttn(nn.Module):
    """Deformable attention over `num_levels` maps.

    forward(query [B, Q, C], reference_points [B, Q, L, 2 or 4], value [B, S, C],
    spatial_shapes [(h, w)] per level, padding_mask Bool[B, S] True on padding or None) -> [B, Q, C].

    reference_points are normalised to each level's padded map: (x, y) points, or (cx, cy, w, h) boxes, in
    which case the offsets are in units of half the box size divided by `num_points` (Deformable-DETR's
    two-stage / box-refinement form).

    backend: "auto", "pytorch" (grid_sample) or "triton" (see resolve_backend); chosen per call from the value's
    device, so a module moved between CPU and GPU keeps working under "auto".
    """

    def __init__(self, d_model: int, num_levels: int, num_heads: int, num_points: int, backend: str = "auto") -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"MSDeformAttn: d_model {d_model} not divisible by num_heads {num_heads}")
        resolve_backend(backend, torch.device("cpu"))  # refuses an unknown name now rather than at the first step
        self.backend = backend
        self.d_model = d_model
        self.num_levels = num_levels
        self.num_heads = num_heads
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(d_model, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(d_model, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable-DETR's init: head h starts sampling along direction 2 pi h / H, point p at distance p+1."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: list[tuple[int, int]],
        padding_mask: Tensor | None,
    ) -> Tensor:
        batch, num_queries, _ = query.shape
        num_values = value.shape[1]
        if sum(h * w for h, w in spatial_shapes) != num_values:
            raise ValueError(f"MSDeformAttn: spatial_shapes {spatial_shapes} do not cover {num_values} values")
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(batch, num_values, heads, self.d_model // heads)
        # Sampling locations in float32: half precision would misplace them by a fraction of a pixel.
        offsets = self.sampling_offsets(query).float().view(batch, num_queries, heads, levels * points * 2)
        weights = self.attention_weights(query).float().view(batch, num_queries, heads, levels * points)
        weights = weights.softmax(-1).view(batch, num_queries, heads, levels, points)
        ref = reference_points.float()
        # locations = centre + offsets * scale, both per (level, x/y): broadcast over points before the one
        # multiply-add over all heads (a broadcast on the innermost axes runs several times slower on CPU).
        if ref.shape[-1] == 2:
            # Offsets are in pixels of each level: scale by 1 / (w, h).
            centre = ref
            normalizer = size_table([(w, h) for h, w in spatial_shapes], offsets, torch.float32)
            scale = normalizer.reciprocal()[None, None]
        elif ref.shape[-1] == 4:
            # Offsets are in units of half the reference box per point.
            centre, scale = ref[..., :2], ref[..., 2:] * (0.5 / points)
        else:
            raise ValueError(f"MSDeformAttn: reference_points last dim {ref.shape[-1]}; expected 2 or 4")

        def per_point(t: Tensor) -> Tensor:
            # [B or 1, Q or 1, L, 2] -> [B or 1, Q or 1, 1, L * P * 2]
            return t[:, :, None, :, None, :].expand(*t.shape[:2], 1, levels, points, 2).flatten(3)

        locations = torch.addcmul(per_point(centre), offsets, per_point(scale))
        locations = locations.view(batch, num_queries, heads, levels, points, 2)
        if resolve_backend(self.backend, value.device) == "triton":
            sampler = _triton_sampler()
            if isinstance(sampler, ImportError):
                raise ImportError(f"MSDeformAttn: backend 'triton' needs the triton package: {sampler}") from sampler
            out = sampler(value, spatial_shapes, locations, weights)
        else:
            out = ms_deform_attn_sample(value, spatial_shapes, locations, weights)
        return self.output_proj(out)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, levels={self.num_levels}, heads={self.num_heads}, points={self.num_points}, "
            f"backend={self.backend}"
        )
