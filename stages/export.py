"""export: a fine-tuned detector as an ONNX graph with its preprocessing, checked against PyTorch.

    python run.py stage=export stage.init_from=<run dir | stage dir | checkpoint>

Writes <stage dir>/model.onnx (input `images` float32 [N, 3, H, W], RGB 0-255; outputs `scores` [N, D], `labels`
int64 [N, D] (contiguous, mapped to dataset ids by model.json), `boxes` [N, D, 4] xyxy in input pixels) and
model.json (categories, input sizes, preprocessing, the check's differences). The DETR family (Co-DETR as its plain
DETR) goes through torch.export with dynamic batch, height and width (`stage.dynamic_size=false`: one fixed size,
which ONNX Runtime runs faster); the torchvision detectors, whose NMS torch.export cannot trace, through the
TorchScript exporter at one fixed input size.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from models.deploy import DeployedDetector
from models.layers.ms_deform_attn import MSDeformAttn
from models.meta_arch.deformable_detr import DeformableDETR
from stages.api import load_detector
from stages.context import open_stage
from stages.engine.checkpoint import resolve_checkpoint
from stages.engine.files import atomic_write_text
from stages.errors import UserError
from stages.onnx_model import METADATA_KEY, ONNX_FORMAT

log = logging.getLogger("detpipe")
OUTPUTS = ("scores", "labels", "boxes")


def example_images(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Random RGB 0-255 images: the trace example and the check inputs."""
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 255


def export_graph(wrapper: DeployedDetector, path: Path, cfg: DictConfig, dynamic: bool) -> None:
    height, width = cfg.stage.input_size
    names = {"input_names": ["images"], "output_names": list(OUTPUTS), "opset_version": int(cfg.stage.opset)}
    if dynamic:
        sizes = {"min": int(cfg.stage.min_size), "max": int(cfg.stage.max_size)}
        dims = {
            "images": {
                # A batch of 2 traces the batch axis as a variable (torch.export specialises sizes of 1).
                0: torch.export.Dim("batch", min=1, max=1024),
                2: torch.export.Dim("height", **sizes),
                3: torch.export.Dim("width", **sizes),
            }
        }
        example = example_images(2, height, width, cfg.seed)
        program = torch.onnx.export(wrapper, (example,), None, dynamo=True, dynamic_shapes=dims, **names)
        program.save(str(path))
    elif isinstance(wrapper.detector, DeformableDETR):
        example = example_images(1, height, width, cfg.seed)
        torch.onnx.export(wrapper, (example,), None, dynamo=True, **names).save(str(path))
    else:
        example = example_images(1, height, width, cfg.seed)
        torch.onnx.export(wrapper, (example,), str(path), dynamo=False, **names)


def check_against_pytorch(wrapper: DeployedDetector, path: Path, cfg: DictConfig, dynamic: bool) -> list[dict]:
    """ONNX Runtime against PyTorch on random images (other sizes and batches than the trace's when dynamic); a
    UserError when a difference passes the tolerances."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    height, width = cfg.stage.input_size
    shapes = [(1, height, width)]
    if dynamic:
        shapes += [
            (3, max(cfg.stage.min_size, height // 2 + 17), width),
            (1, height, max(cfg.stage.min_size, width - 31)),
        ]
    checks = []
    for i, (batch, h, w) in enumerate(shapes):
        images = example_images(batch, h, w, cfg.seed + 1 + i)
        with torch.no_grad():
            expected = [t.numpy() for t in wrapper(images)]
        got = session.run(None, {"images": images.numpy()})
        check = {
            "shape": [batch, 3, h, w],
            "max_score_diff": float(np.abs(got[0] - expected[0]).max()),
            "labels_equal": bool((got[1] == expected[1]).all()),
            "max_box_diff_px": float(np.abs(got[2] - expected[2]).max()),
        }
        checks.append(check)
        relative = check["max_box_diff_px"] / max(h, w)
        if check["max_score_diff"] > cfg.stage.score_tolerance or relative > cfg.stage.box_tolerance:
            raise UserError(
                f"{path}: ONNX Runtime differs from PyTorch on {check['shape']} (scores by {check['max_score_diff']:.2e}, "
                f"boxes by {relative:.2e} of the image); expected at most stage.score_tolerance="
                f"{cfg.stage.score_tolerance} and stage.box_tolerance={cfg.stage.box_tolerance}"
            )
    return checks


def add_metadata(path: Path, info: dict) -> None:
    """model.json's content inside the graph too, so the .onnx file alone says what it is."""
    import onnx

    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(info)
    onnx.save(model, str(path))


def run(cfg: DictConfig) -> dict:
    ctx = open_stage(cfg)
    if not cfg.stage.init_from:
        raise UserError("stage.init_from: not set; expected a fine-tuned run directory, stage directory or checkpoint")
    detector = load_detector(cfg.stage.init_from)
    model = detector.model.cpu().eval()
    for module in model.modules():
        if isinstance(module, MSDeformAttn):
            # The graph holds ONNX operators: the grid_sample path, whatever device the model was trained on.
            module.backend = "pytorch"
    wrapper = DeployedDetector(model).eval()
    # torch.export traces the DETR family with a variable batch and size; the torchvision detectors' NMS it cannot.
    dynamic = isinstance(model, DeformableDETR) and bool(cfg.stage.dynamic_size)
    height, width = (int(v) for v in cfg.stage.input_size)

    final = ctx.out / "model.onnx"
    temporary = ctx.out / ".model.onnx.partial"
    export_graph(wrapper, temporary, cfg, dynamic)
    checks = check_against_pytorch(wrapper, temporary, cfg, dynamic)
    trained = OmegaConf.create(detector.config)
    info = {
        "format": ONNX_FORMAT,
        "source": str(resolve_checkpoint(cfg.stage.init_from)),
        "architecture": type(model).__name__,
        "categories": detector.categories,
        "input": {
            "name": "images",
            "layout": "NCHW",
            "dtype": "float32",
            "values": "RGB 0-255",
            "dynamic_size": dynamic,
            "batch": "any" if dynamic else 1,
            "size": [[cfg.stage.min_size, cfg.stage.max_size]] * 2 if dynamic else [height, width],
        },
        "outputs": {
            "scores": "float32 [N, D]",
            "labels": "int64 [N, D]: index into categories",
            "boxes": "float32 [N, D, 4]: x1, y1, x2, y2 in input pixels",
        },
        # Inside the graph: x / 255, then (x - mean) / std per channel, then zero padding to a multiple of the
        # stride. Outside it, as in training: resize so the shorter side is min_size and the longer at most max_size.
        "preprocessing": {
            "mean": list(trained.model.detector.pixel_mean),
            "std": list(trained.model.detector.pixel_std),
            "resize": {
                "min_size": int(trained.data.transforms.val.min_sizes[0]),
                "max_size": int(trained.data.transforms.val.max_size),
            },
        },
        "opset": int(cfg.stage.opset),
        "checks": checks,
    }
    add_metadata(temporary, info)
    os.replace(temporary, final)
    atomic_write_text(ctx.out / "model.json", json.dumps(info, indent=2) + "\n")
    log.info(
        "export: %s (%s), checked against PyTorch on %d inputs",
        final,
        "dynamic size" if dynamic else f"{height}x{width}",
        len(checks),
    )
    return ctx.write_summary({"checkpoint": None, "model": str(final), "metrics": checks[0], "dynamic_size": dynamic})
