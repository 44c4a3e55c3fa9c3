"""The Triton deformable-attention kernels agree with the grid_sample path, forward and backward, under Triton's
interpreter on CPU; the backend switch picks, threads from config and refuses what it should.

TRITON_INTERPRET takes effect only when set before triton is imported (triton jits its own tl.sum, tl.zeros
then), and this pytest process has imported it already or may later import it uncontrolled; so the kernel runs
in one child process started with it set (`interpreted_differences`), and the tests here read its numbers.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from models.layers import ms_deform_attn
from models.layers.deformable_transformer import DeformableTransformer
from models.layers.ms_deform_attn import MSDeformAttn, ms_deform_attn_sample, resolve_backend
from tests.helpers import (
    ROOT,  # noqa: E402
    compose_config,
)

# Several levels, odd sizes, a 1 x 1 map; 5 channels per head exercise the padded channel block.
SHAPES = [(5, 7), (3, 5), (1, 1)]
BATCH, QUERIES, HEADS, HEAD_DIM, POINTS = 2, 9, 2, 5, 3


def _inputs(seed: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    num_values = sum(h * w for h, w in SHAPES)
    value = torch.randn(BATCH, num_values, HEADS, HEAD_DIM, generator=g).to(dtype)
    # Inside, partly outside (within a pixel of the border) and far outside each map.
    locations = torch.rand(BATCH, QUERIES, HEADS, len(SHAPES), POINTS, 2, generator=g) * 1.6 - 0.3
    locations[0, 0, :, :, 0] = torch.tensor([-4.0, 0.5])
    locations[0, 1, :, :, 0] = torch.tensor([0.5, 7.5])
    locations[1, 2, :, :, 1] = torch.tensor([-1e9, 1e9])  # far enough that a careless int conversion overflows
    locations[1, 3, :, :, 2] = torch.tensor([0.02, 0.99])
    weights = torch.rand(BATCH, QUERIES, HEADS, len(SHAPES), POINTS, generator=g)
    grad_out = torch.randn(BATCH, QUERIES, HEADS * HEAD_DIM, generator=g)
    return value, locations, weights, grad_out


def _forward_backward(sample, value, locations, weights, grad_out):
    inputs = [t.detach().clone().requires_grad_() for t in (value, locations, weights)]
    out = sample(inputs[0], SHAPES, inputs[1], inputs[2])
    return [out, *torch.autograd.grad(out, inputs, grad_out.to(out.dtype))]


def _kernel_differences(dtype: torch.dtype) -> dict:
    """Max |triton - grid_sample| of (out, grad value, grad locations, grad weights); for half precision, of out and
    grad value in units of eps * (1 + |grid_sample|), the last bit of rounding to dtype."""
    from models.layers.ms_deform_attn_triton import ms_deform_attn_triton

    value, locations, weights, grad_out = _inputs(0 if dtype == torch.float32 else 1, dtype)
    ref = _forward_backward(ms_deform_attn_sample, value, locations, weights, grad_out)
    got = _forward_backward(ms_deform_attn_triton, value, locations, weights, grad_out)
    diffs = [(a.double() - b.double()).abs() for a, b in zip(got, ref)]
    if dtype != torch.float32:
        eps = torch.finfo(dtype).eps
        diffs[:2] = [d / (eps * (1 + r.double().abs())) for d, r in zip(diffs[:2], ref[:2])]
    far = max(got[2][1, 2, :, :, 1].abs().max().item(), got[3][1, 2, :, :, 1].abs().max().item())
    return {
        "dtypes": [str(t.dtype) for t in got],
        "out": diffs[0].max().item(),
        "grad_value": diffs[1].max().item(),
        "grad_locations": diffs[2].max().item(),
        "grad_weights": diffs[3].max().item(),
        "far_point_grads": far,
    }


def _module_differences(reference_dim: int) -> dict:
    """MSDeformAttn with a padding mask, one module run by both backends: max |difference| of the output and of
    every gradient (inputs and parameters); and what changing the padded values changes under Triton."""
    torch.manual_seed(4)
    attn = MSDeformAttn(d_model=8, num_levels=len(SHAPES), num_heads=2, num_points=2)
    for p in attn.parameters():
        nn.init.normal_(p, std=0.5)
    g = torch.Generator().manual_seed(5)
    num_values = sum(h * w for h, w in SHAPES)
    query = torch.randn(BATCH, 6, 8, generator=g)
    reference = torch.rand(BATCH, 6, len(SHAPES), reference_dim, generator=g)
    value = torch.randn(BATCH, num_values, 8, generator=g)
    # Image 1 is narrower: the right two columns of the finest level and the right one of the next are padding.
    level_masks = [torch.zeros(BATCH, h, w, dtype=torch.bool) for h, w in SHAPES]
    level_masks[0][1, :, 5:] = True
    level_masks[1][1, :, 4:] = True
    mask = torch.cat([m.flatten(1) for m in level_masks], 1)

    def run(backend: str, value: torch.Tensor):
        attn.backend = backend
        attn.zero_grad()
        q, v = query.clone().requires_grad_(), value.clone().requires_grad_()
        out = attn(q, reference, v, SHAPES, mask)
        out.pow(2).sum().backward()
        return out.detach(), [q.grad, v.grad] + [p.grad.clone() for p in attn.parameters()]

    ref, ref_grads = run("pytorch", value)
    out, grads = run("triton", value)
    changed = value.clone()
    changed[mask] = 100.0
    out_changed, _ = run("triton", changed)
    return {
        "out": (out - ref).abs().max().item(),
        "grads": max(((a - b).abs() / (1 + b.abs())).max().item() for a, b in zip(grads, ref_grads)),
        "padding_changes_out": (out_changed - out).abs().max().item(),
        "padding_grad": grads[1][mask].abs().max().item(),
    }


def interpreted_differences() -> dict:
    """Every kernel check, run in a process started with TRITON_INTERPRET=1."""
    from models.layers import ms_deform_attn_triton

    assert ms_deform_attn_triton.INTERPRETED, "start this process with TRITON_INTERPRET=1"
    results = {
        "float32": _kernel_differences(torch.float32),
        "bfloat16": _kernel_differences(torch.bfloat16),
        "float16": _kernel_differences(torch.float16),
        "module_points": _module_differences(2),
        "module_boxes": _module_differences(4),
    }
    # Four queries a program (head_dim 5 -> 8): several query blocks and a ragged last one.
    ms_deform_attn_triton.TILE_ELEMENTS = 32
    results["float32_small_tiles"] = _kernel_differences(torch.float32)
    return results


@pytest.fixture(scope="module")
def interpreted() -> dict:
    pytest.importorskip("triton")  # the CPU build of torch comes without it
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    code = "import json; from tests.models.test_msda_triton import interpreted_differences as f; print(json.dumps(f()))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["float32", "float32_small_tiles"])
def test_triton_kernel_matches_grid_sample_in_float32(interpreted, case):
    result = interpreted[case]
    assert result["dtypes"] == ["torch.float32"] * 4
    assert result["out"] <= 1e-5, result
    assert max(result["grad_value"], result["grad_locations"], result["grad_weights"]) <= 1e-4, result
    assert result["far_point_grads"] == 0, result  # a point far outside reads nothing and learns nothing


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_triton_kernel_takes_half_precision_values_like_grid_sample(interpreted, dtype):
    result = interpreted[dtype]
    # Output and value gradient in the value's dtype; locations and weights stay float32.
    assert result["dtypes"] == [f"torch.{dtype}"] * 2 + ["torch.float32"] * 2
    # Both compute in float32 from the same inputs: at most the last bit of the rounding to dtype differs.
    assert result["out"] <= 1 and result["grad_value"] <= 1, result
    assert max(result["grad_locations"], result["grad_weights"]) <= 1e-4, result


@pytest.mark.parametrize("case", ["module_points", "module_boxes"])
def test_module_backends_agree_with_a_padding_mask(interpreted, case):
    result = interpreted[case]
    assert result["out"] <= 1e-5 and result["grads"] <= 1e-4, result
    assert result["padding_changes_out"] == 0 and result["padding_grad"] == 0, result


def test_auto_backend_uses_grid_sample_on_cpu(monkeypatch):
    pytest.importorskip("triton")
    assert resolve_backend("auto", torch.device("cpu")) == "pytorch"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    assert resolve_backend("pytorch", torch.device("cuda")) == "pytorch"

    def refuse(*args):
        raise AssertionError("auto ran the Triton kernel on CPU")

    monkeypatch.setattr(ms_deform_attn, "_triton_sampler", lambda: refuse)
    attn = MSDeformAttn(d_model=8, num_levels=1, num_heads=2, num_points=2)
    out = attn(torch.randn(1, 3, 8), torch.rand(1, 3, 1, 2), torch.randn(1, 6, 8), [(2, 3)], None)
    assert out.shape == (1, 3, 8)


def test_an_unknown_backend_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown backend 'cuda'; expected one of auto, pytorch, triton"):
        MSDeformAttn(d_model=8, num_levels=1, num_heads=2, num_points=2, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend 'Triton'"):
        DeformableTransformer(16, 2, 1, 1, 32, 0.0, 2, 2, msda_backend="Triton")


def test_triton_backend_on_cpu_without_the_interpreter_says_what_it_needs():
    pytest.importorskip("triton")
    from models.layers import ms_deform_attn_triton

    if ms_deform_attn_triton.INTERPRETED:
        pytest.skip("this session runs Triton's interpreter")
    value, locations, weights, _ = _inputs(6)
    attn = MSDeformAttn(d_model=8, num_levels=1, num_heads=2, num_points=2, backend="triton")
    with pytest.raises(ValueError, match="needs CUDA tensors.*TRITON_INTERPRET=1"):
        attn(torch.randn(1, 3, 8), torch.rand(1, 3, 1, 2), torch.randn(1, 6, 8), [(2, 3)], None)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        ms_deform_attn_triton.ms_deform_attn_triton(value, SHAPES, locations, weights)


@pytest.mark.parametrize("model", ["deformable_detr", "co_deformable_detr"])
def test_msda_backend_reaches_every_deformable_attention_from_config(model):
    from hydra.utils import instantiate

    assert compose_config([f"model={model}"]).model.msda_backend == "auto"
    cfg = compose_config([f"model={model}", "experiment=smoke", "model.msda_backend=pytorch"])
    transformer = instantiate(cfg.model.detector.transformer)
    attns = [m for m in transformer.modules() if isinstance(m, MSDeformAttn)]
    assert len(attns) == cfg.model.num_encoder_layers + cfg.model.num_decoder_layers
    assert {m.backend for m in attns} == {"pytorch"}
