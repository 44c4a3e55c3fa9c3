"""Multi-scale deformable attention as two Triton kernels (forward; backward for values, locations and weights).

The contract is `models.layers.ms_deform_attn.ms_deform_attn_sample`'s: value [B, S, H, Dh] (levels flattened one after
another), locations [B, Q, H, L, P, 2] as (x, y) in [0, 1] of each level's map, weights [B, Q, H, L, P] ->
[B, Q, H * Dh]. Sampling is bilinear with grid_sample's align_corners=False convention (pixel = loc * size - 0.5)
and zeros outside the map; arithmetic is float32 whatever the inputs; the result has value's dtype.

Each program takes BLOCK_Q queries of one (batch, head) and the whole head_dim, so the backward's sums over
channels (the location and weight gradients) stay inside one program; only the value gradient, which many
queries may write to the same pixel, needs atomic adds.

Triton's interpreter runs the same kernels on CPU tensors when TRITON_INTERPRET=1 is set before triton is imported;
that is how they are tested (tests/test_msda_triton.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Elements of one [BLOCK_Q, BLOCK_D] tile. BLOCK_D is head_dim rounded up to a power of two (tl.arange needs one)
# and BLOCK_Q = TILE_ELEMENTS / BLOCK_D: 16 queries per program at Deformable-DETR's head_dim of 32. With
# NUM_WARPS = 4 that is 4 float32 per thread per tile; a program keeps about eight tiles live (four corners and
# the accumulator, or the incoming gradient and two partial derivatives), and ptxas for sm_80 and sm_90 reports
# no spills (forward 64 registers, backward about 124, head_dim 8 to 64); twice the tile takes about 190 registers
# in the backward and spills in the forward. Chosen by register count only: not yet timed on a GPU.
TILE_ELEMENTS = 512
NUM_WARPS = 4
# Offsets inside one image are int32 (fewer registers than int64); the wrapper refuses an image beyond this.
_INT32_LIMIT = 2**31 - 1
# triton.jit makes a kernel compiled or interpreted when it decorates it, and triton's own library (tl.sum,
# tl.zeros) when triton is imported: TRITON_INTERPRET must be set before that, and later changes do nothing.
INTERPRETED = bool(triton.knobs.runtime.interpret)


@triton.jit
def _bilinear_corners(
    value_ptr,
    loc_ptr,
    lp,
    q_ok,
    col_ok,
    d,
    h,
    w,
    level_start,
    head,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """The four corners of sampling point `lp` of each query (north-west (x0, y0), north-east (x0 + 1, y0),
    south-west (x0, y0 + 1), south-east): their value offsets and masks [BLOCK_Q, BLOCK_D] (False outside the
    map), their values in float32, and the bilinear weights wx0, wx1, wy0, wy1 [BLOCK_Q, 1]; pixel = loc * size
    - 0.5 (grid_sample's align_corners=False). The forward and the backward kernel walk the same corners."""
    # A point beyond the map has no corner inside whether it is 2 or 2e9 pixels out; the clamp only keeps the
    # integer conversion below in range.
    px = tl.minimum(tl.maximum(tl.load(loc_ptr + 2 * lp, mask=q_ok, other=0.0) * w - 0.5, -2.0), w + 1.0)
    py = tl.minimum(tl.maximum(tl.load(loc_ptr + 2 * lp + 1, mask=q_ok, other=0.0) * h - 0.5, -2.0), h + 1.0)
    x0f = tl.floor(px)
    y0f = tl.floor(py)
    fx = px - x0f
    fy = py - y0f
    x0 = x0f.to(tl.int32)
    y0 = y0f.to(tl.int32)
    x0_in = (x0 >= 0) & (x0 < w)
    x1_in = (x0 + 1 >= 0) & (x0 + 1 < w)
    y0_in = (y0 >= 0) & (y0 < h)
    y1_in = (y0 + 1 >= 0) & (y0 + 1 < h)
    nw_off = (((level_start + y0 * w + x0) * NUM_HEADS + head) * HEAD_DIM)[:, None] + d[None, :]
    ne_off = nw_off + NUM_HEADS * HEAD_DIM
    sw_off = nw_off + w * NUM_HEADS * HEAD_DIM
    se_off = sw_off + NUM_HEADS * HEAD_DIM
    nw_mask = (q_ok & y0_in & x0_in)[:, None] & col_ok
    ne_mask = (q_ok & y0_in & x1_in)[:, None] & col_ok
    sw_mask = (q_ok & y1_in & x0_in)[:, None] & col_ok
    se_mask = (q_ok & y1_in & x1_in)[:, None] & col_ok
    v_nw = tl.load(value_ptr + nw_off, mask=nw_mask, other=0.0).to(tl.float32)
    v_ne = tl.load(value_ptr + ne_off, mask=ne_mask, other=0.0).to(tl.float32)
    v_sw = tl.load(value_ptr + sw_off, mask=sw_mask, other=0.0).to(tl.float32)
    v_se = tl.load(value_ptr + se_off, mask=se_mask, other=0.0).to(tl.float32)
    wx0 = (1 - fx)[:, None]
    wx1 = fx[:, None]
    wy0 = (1 - fy)[:, None]
    wy1 = fy[:, None]
    return (
        nw_off,
        ne_off,
        sw_off,
        se_off,
        nw_mask,
        ne_mask,
        sw_mask,
        se_mask,
        v_nw,
        v_ne,
        v_sw,
        v_se,
        wx0,
        wx1,
        wy0,
        wy1,
    )


@triton.jit
def _forward_kernel(
    value_ptr,  # [B, S, H, Dh], any float dtype
    levels_ptr,  # int32 [L, 3]: (h, w, first index in S) per level
    loc_ptr,  # float32 [B, Q, H, L, P, 2]
    weight_ptr,  # float32 [B, Q, H, L, P]
    out_ptr,  # [B, Q, H, Dh], value's dtype
    num_values,
    num_queries,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_LEVELS: tl.constexpr,
    NUM_POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    batch = tl.program_id(1) // NUM_HEADS
    head = tl.program_id(1) % NUM_HEADS
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    q_ok = q < num_queries
    d_ok = d < HEAD_DIM
    # Offsets within one image fit in int32 (the wrapper checks), which halves the registers that address
    # arithmetic takes; only the step to this program's image needs int64.
    image = batch.to(tl.int64)
    value_ptr += image * num_values * NUM_HEADS * HEAD_DIM
    loc_ptr += image * num_queries * NUM_HEADS * NUM_LEVELS * NUM_POINTS * 2
    weight_ptr += image * num_queries * NUM_HEADS * NUM_LEVELS * NUM_POINTS
    out_ptr += image * num_queries * NUM_HEADS * HEAD_DIM
    row = q * NUM_HEADS + head  # (q, head) in [Q * H]
    col_ok = d_ok[None, :]
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    for level in range(NUM_LEVELS):
        h = tl.load(levels_ptr + 3 * level)
        w = tl.load(levels_ptr + 3 * level + 1)
        level_start = tl.load(levels_ptr + 3 * level + 2)
        for point in range(NUM_POINTS):
            lp = (row * NUM_LEVELS + level) * NUM_POINTS + point
            attn = tl.load(weight_ptr + lp, mask=q_ok, other=0.0)
            (_, _, _, _, _, _, _, _, v_nw, v_ne, v_sw, v_se, wx0, wx1, wy0, wy1) = _bilinear_corners(
                value_ptr, loc_ptr, lp, q_ok, col_ok, d, h, w, level_start, head, NUM_HEADS, HEAD_DIM
            )
            sample = (v_nw * wx0 + v_ne * wx1) * wy0 + (v_sw * wx0 + v_se * wx1) * wy1
            acc += attn[:, None] * sample
    out_ptrs = out_ptr + (row * HEAD_DIM)[:, None] + d[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=q_ok[:, None] & col_ok)


@triton.jit
def _backward_kernel(
    value_ptr,  # [B, S, H, Dh], any float dtype
    levels_ptr,  # int32 [L, 3]: (h, w, first index in S) per level
    loc_ptr,  # float32 [B, Q, H, L, P, 2]
    weight_ptr,  # float32 [B, Q, H, L, P]
    grad_out_ptr,  # [B, Q, H, Dh], any float dtype
    grad_value_ptr,  # float32 [B, S, H, Dh], zeros on entry (atomic adds)
    grad_loc_ptr,  # float32 [B, Q, H, L, P, 2]
    grad_weight_ptr,  # float32 [B, Q, H, L, P]
    num_values,
    num_queries,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_LEVELS: tl.constexpr,
    NUM_POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # The same walk over (level, point) as _forward_kernel.
    batch = tl.program_id(1) // NUM_HEADS
    head = tl.program_id(1) % NUM_HEADS
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    q_ok = q < num_queries
    d_ok = d < HEAD_DIM
    image = batch.to(tl.int64)
    value_ptr += image * num_values * NUM_HEADS * HEAD_DIM
    loc_ptr += image * num_queries * NUM_HEADS * NUM_LEVELS * NUM_POINTS * 2
    weight_ptr += image * num_queries * NUM_HEADS * NUM_LEVELS * NUM_POINTS
    grad_out_ptr += image * num_queries * NUM_HEADS * HEAD_DIM
    grad_value_ptr += image * num_values * NUM_HEADS * HEAD_DIM
    grad_loc_ptr += image * num_queries * NUM_HEADS * NUM_LEVELS * NUM_POINTS * 2
    grad_weight_ptr += image * num_queries * NUM_HEADS * NUM_LEVELS * NUM_POINTS
    row = q * NUM_HEADS + head
    col_ok = d_ok[None, :]
    grad_out = tl.load(grad_out_ptr + (row * HEAD_DIM)[:, None] + d[None, :], mask=q_ok[:, None] & col_ok, other=0.0)
    grad_out = grad_out.to(tl.float32)
    for level in range(NUM_LEVELS):
        h = tl.load(levels_ptr + 3 * level)
        w = tl.load(levels_ptr + 3 * level + 1)
        level_start = tl.load(levels_ptr + 3 * level + 2)
        for point in range(NUM_POINTS):
            lp = (row * NUM_LEVELS + level) * NUM_POINTS + point
            attn = tl.load(weight_ptr + lp, mask=q_ok, other=0.0)
            (
                nw_off,
                ne_off,
                sw_off,
                se_off,
                nw_mask,
                ne_mask,
                sw_mask,
                se_mask,
                v_nw,
                v_ne,
                v_sw,
                v_se,
                wx0,
                wx1,
                wy0,
                wy1,
            ) = _bilinear_corners(value_ptr, loc_ptr, lp, q_ok, col_ok, d, h, w, level_start, head, NUM_HEADS, HEAD_DIM)

            # out = sum attn * sample: d/d attn is <grad_out, sample>.
            sample = (v_nw * wx0 + v_ne * wx1) * wy0 + (v_sw * wx0 + v_se * wx1) * wy1
            tl.store(grad_weight_ptr + lp, tl.sum(grad_out * sample, axis=1), mask=q_ok)

            # sample is linear in px and py between the corners, and px = x * w - 0.5: d/dx = w * d/dpx.
            d_px = (v_ne - v_nw) * wy0 + (v_se - v_sw) * wy1
            d_py = (v_sw - v_nw) * wx0 + (v_se - v_ne) * wx1
            tl.store(grad_loc_ptr + 2 * lp, attn * w * tl.sum(grad_out * d_px, axis=1), mask=q_ok)
            tl.store(grad_loc_ptr + 2 * lp + 1, attn * h * tl.sum(grad_out * d_py, axis=1), mask=q_ok)

            # Each corner received attn * its bilinear weight of grad_out; queries share pixels, hence atomics
            # (relaxed: only the sums matter, not their order).
            spread = grad_out * attn[:, None]
            tl.atomic_add(grad_value_ptr + nw_off, spread * wx0 * wy0, mask=nw_mask, sem="relaxed")
            tl.atomic_add(grad_value_ptr + ne_off, spread * wx1 * wy0, mask=ne_mask, sem="relaxed")
            tl.atomic_add(grad_value_ptr + sw_off, spread * wx0 * wy1, mask=sw_mask, sem="relaxed")
            tl.atomic_add(grad_value_ptr + se_off, spread * wx1 * wy1, mask=se_mask, sem="relaxed")


def _blocks(head_dim: int) -> tuple[int, int]:
    """(BLOCK_Q, BLOCK_D): the whole head in one tile row (tl.arange needs powers of two), TILE_ELEMENTS a tile."""
    block_d = triton.next_power_of_2(head_dim)
    return max(1, TILE_ELEMENTS // block_d), block_d


def _level_table(spatial_shapes: tuple[tuple[int, int], ...], device: torch.device) -> Tensor:
    """int32 [L, 3]: (h, w, first index in S) per level, on `device`."""
    rows, start = [], 0
    for h, w in spatial_shapes:
        rows.append((h, w, start))
        start += h * w
    table = torch.tensor(rows, dtype=torch.int32)
    if device.type == "cuda":
        # From pinned memory without blocking: a plain host-to-device copy would wait for the GPU at every call.
        table = table.pin_memory().to(device, non_blocking=True)
    return table


class _MSDeformAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, value: Tensor, spatial_shapes: tuple[tuple[int, int], ...], locations: Tensor, weights: Tensor
    ) -> Tensor:
        batch, num_values, heads, head_dim = value.shape
        _, num_queries, _, levels, points, _ = locations.shape
        value = value.contiguous()
        # float32 in, as the grid_sample path: half-precision locations would misplace samples by a fraction of a
        # pixel. The MSDeformAttn module already passes float32, so these are no-ops there.
        locations32 = locations.float().contiguous()
        weights32 = weights.float().contiguous()
        table = _level_table(spatial_shapes, value.device)
        out = value.new_empty(batch, num_queries, heads * head_dim)
        ctx.save_for_backward(value, table, locations32, weights32)
        ctx.input_dtypes = (locations.dtype, weights.dtype)
        if batch * num_queries == 0:
            return out  # Triton refuses an empty grid
        block_q, block_d = _blocks(head_dim)
        grid = (triton.cdiv(num_queries, block_q), batch * heads)
        _forward_kernel[grid](
            value,
            table,
            locations32,
            weights32,
            out,
            num_values,
            num_queries,
            NUM_HEADS=heads,
            HEAD_DIM=head_dim,
            NUM_LEVELS=levels,
            NUM_POINTS=points,
            BLOCK_Q=block_q,
            BLOCK_D=block_d,
            num_warps=NUM_WARPS,
        )
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, None, Tensor | None, Tensor | None]:
        value, table, locations32, weights32 = ctx.saved_tensors
        batch, num_values, heads, head_dim = value.shape
        _, num_queries, _, levels, points, _ = locations32.shape
        grad_value = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
        grad_locations = torch.empty_like(locations32)
        grad_weights = torch.empty_like(weights32)
        if batch * num_queries:
            block_q, block_d = _blocks(head_dim)
            grid = (triton.cdiv(num_queries, block_q), batch * heads)
            _backward_kernel[grid](
                value,
                table,
                locations32,
                weights32,
                grad_out.contiguous(),
                grad_value,
                grad_locations,
                grad_weights,
                num_values,
                num_queries,
                NUM_HEADS=heads,
                HEAD_DIM=head_dim,
                NUM_LEVELS=levels,
                NUM_POINTS=points,
                BLOCK_Q=block_q,
                BLOCK_D=block_d,
                num_warps=NUM_WARPS,
            )
        # One kernel computes all three; hand autograd only what it asked for, in the inputs' dtypes.
        needs_value, _, needs_locations, needs_weights = ctx.needs_input_grad
        locations_dtype, weights_dtype = ctx.input_dtypes
        return (
            grad_value.to(value.dtype) if needs_value else None,
            None,
            grad_locations.to(locations_dtype) if needs_locations else None,
            grad_weights.to(weights_dtype) if needs_weights else None,
        )


def ms_deform_attn_triton(
    value: Tensor, spatial_shapes: list[tuple[int, int]], locations: Tensor, weights: Tensor
) -> Tensor:
    """`ms_deform_attn_sample` run by the Triton kernels; value's device must be CUDA unless TRITON_INTERPRET=1.

    value [B, S, H, Dh], locations [B, Q, H, L, P, 2] (x, y) in [0, 1], weights [B, Q, H, L, P] -> [B, Q, H * Dh]
    in value's dtype (float32, bfloat16 or float16; computed in float32). Differentiable in all three tensors.
    """
    if value.device.type != "cuda" and not INTERPRETED:
        raise ValueError(
            f"ms_deform_attn_triton: value is on {value.device}; the Triton kernel needs CUDA tensors (or "
            "TRITON_INTERPRET=1 in the environment before triton is imported, to run it through Triton's "
            "interpreter on CPU); the pytorch backend runs anywhere"
        )
    shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
    batch, num_values, heads, _ = value.shape
    if sum(h * w for h, w in shapes) != num_values:
        raise ValueError(f"ms_deform_attn_triton: spatial_shapes {list(shapes)} do not cover {num_values} values")
    expected = (batch, *locations.shape[1:2], heads, len(shapes), *locations.shape[4:5], 2)
    if tuple(locations.shape) != expected or tuple(weights.shape) != expected[:-1]:
        raise ValueError(
            f"ms_deform_attn_triton: locations {tuple(locations.shape)} and weights {tuple(weights.shape)}; "
            f"expected [B, Q, H, L, P, 2] and [B, Q, H, L, P] with B={batch}, H={heads}, L={len(shapes)}"
        )
    largest_offset = max(
        (num_values + max(w for _, w in shapes) + 2) * heads * value.shape[3], weights.shape[1:].numel() * 2
    )
    if largest_offset > _INT32_LIMIT:
        raise ValueError(
            f"ms_deform_attn_triton: one image needs offsets up to {largest_offset}; the kernel indexes an image "
            f"with int32 (at most {_INT32_LIMIT}): use the pytorch backend"
        )
    return _MSDeformAttnFunction.apply(value, shapes, locations, weights)
