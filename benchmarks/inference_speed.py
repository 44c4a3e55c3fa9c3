"""Inference speed of one Deformable-DETR in three runtimes: PyTorch eager, ONNX Runtime (our exported graph), and
Hugging Face `transformers`' DeformableDetr at the same configuration.

    python benchmarks/inference_speed.py [--height 192] [--width 256] [--batch 1] [--steps 30] [--threads 2]
        [hydra overrides of our model]

The model is our CPU preset (`model=deformable_detr`, which is Co-DETR at inference) built as benchmarks/train_step.py
builds it for the comparison with transformers (the same ResNet with frozen BatchNorm, random weights, no
downloads). Ours runs as `models.deploy.DeployedDetector` (0-255 images in; normalisation, padding, the network
and the top-k postprocessing inside), eagerly under `torch.inference_mode` and as the ONNX graph `stage=export`
writes (torch.export; ONNX Runtime's CPU provider), both the default graph for any batch and size and the one for
a fixed size (`stage.dynamic_size=false`). transformers runs its model forward on
normalised images (its postprocessing is not timed, which favours it slightly). The three take their timed runs in
turn, so other load hits all alike; images/s = batch / median seconds per run. Requires the `bench` and `export`
extras.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import train_step  # benchmarks/train_step.py, beside this script: the same model config and transformers mapping

from models.deploy import DeployedDetector
from stages.build import build_model

NUM_CLASSES = 5


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--height", type=int, default=192, help="image height (the synthetic val resize's shorter side)")
    p.add_argument("--width", type=int, default=256, help="image width")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=30, help="timed runs per runtime")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="threads for torch and ONNX Runtime")
    args, extra = p.parse_known_args(argv)
    # train_step.compose_config's size flags: None keeps our config's values.
    for name in ("depth", "d_model", "layers", "queries", "ffn"):
        setattr(args, name, None)
    return args, extra


def onnx_session(wrapper: DeployedDetector, example: torch.Tensor, threads: int, directory: Path, dynamic: bool):
    """ONNX Runtime on the graph stage=export writes: dynamic batch and size, or (stage.dynamic_size=false) the
    example's size only."""
    import onnxruntime

    path = directory / f"model_{'dynamic' if dynamic else 'fixed'}.onnx"
    dims = None
    if dynamic:
        dims = {
            "images": {
                0: torch.export.Dim("batch", min=1, max=1024),
                2: torch.export.Dim("height", min=128, max=4096),
                3: torch.export.Dim("width", min=128, max=4096),
            }
        }
        # A batch of 2 for the trace, as stage=export does (torch.export specialises sizes of 1).
        example = example.repeat(2, 1, 1, 1)
    program = torch.onnx.export(
        wrapper,
        (example,),
        None,
        dynamo=True,
        dynamic_shapes=dims,
        input_names=["images"],
        output_names=["scores", "labels", "boxes"],
        opset_version=18,
    )
    program.save(str(path))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    # ONNX Runtime's worker threads spin after a run by default, taking the cores from the next runtime timed.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main(argv: list[str]) -> None:
    args, extra = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = train_step.compose_config(args, extra)
    torch.manual_seed(0)
    ours = build_model(cfg.model, NUM_CLASSES, num_aux_heads=0).eval()
    wrapper = DeployedDetector(ours).eval()
    from transformers import DeformableDetrForObjectDetection

    torch.manual_seed(0)
    hf = DeformableDetrForObjectDetection(train_step.hf_config(cfg, NUM_CLASSES)).eval()
    mean = torch.tensor(list(cfg.model.detector.pixel_mean)).view(1, -1, 1, 1)
    std = torch.tensor(list(cfg.model.detector.pixel_std)).view(1, -1, 1, 1)
    images = torch.rand(args.batch, 3, args.height, args.width, generator=torch.Generator().manual_seed(0)) * 255
    pixel_mask = torch.ones(args.batch, args.height, args.width, dtype=torch.long)

    with tempfile.TemporaryDirectory() as tmp:
        dynamic = onnx_session(wrapper, images, args.threads, Path(tmp), dynamic=True)
        fixed = onnx_session(wrapper, images, args.threads, Path(tmp), dynamic=False)
        feed = {"images": images.numpy()}

        def eager() -> None:
            with torch.inference_mode():
                wrapper(images)

        def onnx_dynamic() -> None:
            dynamic.run(None, feed)

        def onnx_fixed() -> None:
            fixed.run(None, feed)

        def transformers() -> None:
            with torch.inference_mode():
                hf(pixel_values=(images / 255 - mean) / std, pixel_mask=pixel_mask)

        runners = {
            "pytorch eager": eager,
            "onnx, any size": onnx_dynamic,
            "onnx, fixed size": onnx_fixed,
            "transformers": transformers,
        }
        for run in runners.values():
            for _ in range(args.warmup):
                run()
        seconds = {name: [] for name in runners}
        for _ in range(args.steps):
            for name, run in runners.items():
                start = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - start)

    median = {name: statistics.median(values) for name, values in seconds.items()}
    print(
        f"\nDeformable-DETR inference, {args.batch}x3x{args.height}x{args.width}, {args.threads} threads, "
        f"median of {args.steps} runs"
    )
    print(f"{'runtime':<18}{'ms/run':>10}{'images/s':>10}{'vs eager':>10}")
    for name, value in median.items():
        ratio = median["pytorch eager"] / value
        print(f"{name:<18}{value * 1000:10.1f}{args.batch / value:10.2f}{ratio:9.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
