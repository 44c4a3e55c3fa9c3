"""One GPU check, run once on a CUDA machine (about 8 minutes on one GPU): the Triton deformable-attention kernel
against the grid_sample path, training-step time and memory at the published size, and a short pipeline.

    python benchmarks/gpu_check.py --out gpu_check.json              # on a CUDA machine
    python benchmarks/gpu_check.py --device cpu --tiny --out x.json  # the same code paths on CPU, in seconds

1. Kernel parity: `ms_deform_attn_triton` against `ms_deform_attn_sample` (grid_sample) on Deformable-DETR's
   encoder shapes (4 levels, 8 heads, 4 points; the published 800x1333 input, or tiny ones with --tiny), float32
   and bfloat16: the largest absolute difference of the output and of each input gradient, and that difference
   over the largest grid_sample value. Also the attention's own peak memory (forward + backward of the sampling
   alone) and time per backend.
2. Training steps at the published size (ResNet-50, 6 + 6 layers, 300 queries, about 800x1333 images, batch 2;
   with --tiny the smoke sizes with 2 heads, 1 decoder layer and 64x64 images), for K = 0 and K = 2 auxiliary
   heads, each with both attention backends, in float32 and in bfloat16: median `Trainer.run_step` seconds (a
   Trainer with the config's optimizer, schedule and clipping) and peak memory (CUDA's max_memory_allocated; CPU:
   not measured).
3. A short pipeline end to end on the device (`experiment=smoke`, a few iterations per stage): its exit status,
   seconds and AP.

On CPU the Triton kernel runs under Triton's interpreter (TRITON_INTERPRET=1, set here before triton loads), so
--device cpu checks the code paths, not the speed. Writes one JSON file (--out) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="tiny sizes and one timed step: checks the code paths")
    p.add_argument("--out", type=Path, required=True, help="the JSON file of results")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (Triton compiles, cuDNN tunes)")
    p.add_argument("--skip-pipeline", action="store_true", help="leave out part 3")
    return p.parse_args()


ARGS = parse_args()
if ARGS.device == "cpu":
    # Triton reads this when it is imported: the kernel then runs on CPU tensors, interpreted.
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from models.layers.ms_deform_attn import ms_deform_attn_sample  # noqa: E402
from stages.build import build_model  # noqa: E402
from stages.engine.optim import build_optimizer, build_scheduler  # noqa: E402
from stages.engine.trainer import Trainer, run_steps, to_device  # noqa: E402

# Deformable-DETR's published sizes; --tiny shrinks them to the smoke preset's, with fewer heads and decoder
# layers: the interpreted kernel costs about 0.1 s per program (one per image, head and block of queries), so
# these set how long the dry run takes.
PUBLISHED = {
    "model.detector.backbone.depth": 50,
    "model.d_model": 256,
    "model.num_encoder_layers": 6,
    "model.num_decoder_layers": 6,
    "model.num_queries": 300,
    "model.dim_feedforward": 1024,
    "model.num_heads": 8,
    "model.num_points": 4,
}
TINY = ["experiment=smoke", "model.num_heads=2", "model.num_decoder_layers=1"]
IMAGE = (800, 1333)
TINY_IMAGE = (64, 64)
NUM_CLASSES = 80


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def attention_inputs(device: torch.device, dtype: torch.dtype, tiny: bool, seed: int = 0):
    """value, shapes, locations, weights of one encoder self-attention (every pixel queries every level)."""
    height, width = TINY_IMAGE if tiny else IMAGE
    heads, head_dim, points = (2, 8, 2) if tiny else (8, 32, 4)
    shapes = [(-(-height // s), -(-width // s)) for s in (8, 16, 32, 64)]
    values = sum(h * w for h, w in shapes)
    queries = values
    g = torch.Generator().manual_seed(seed)
    value = torch.randn(1, values, heads, head_dim, generator=g)
    # Some points fall outside the map, as learned offsets do.
    locations = torch.rand(1, queries, heads, len(shapes), points, 2, generator=g) * 1.2 - 0.1
    weights = torch.rand(1, queries, heads, len(shapes), points, generator=g).softmax(-1)
    cast = [t.to(device) for t in (value, locations, weights)]
    cast[0] = cast[0].to(dtype)
    return cast[0], shapes, cast[1], cast[2]


def relative_difference(triton_result: torch.Tensor, reference: torch.Tensor) -> float:
    """The largest absolute difference over the largest absolute reference value."""
    scale = float(reference.abs().max())
    return float((triton_result - reference).abs().max()) / scale if scale > 0 else 0.0


def time_attention(fn, inputs: list[torch.Tensor], shapes, device: torch.device, repeats: int) -> dict:
    """Median milliseconds of one forward + backward of the sampling alone (after one untimed call, which also
    compiles the Triton kernel), and its peak memory beyond the inputs (CUDA only)."""

    def once() -> None:
        for t in inputs:
            t.grad = None
        fn(inputs[0], shapes, inputs[1], inputs[2]).float().square().sum().backward()

    once()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        once()
        sync(device)
        times.append(1000 * (time.perf_counter() - start))
    peak = None
    if device.type == "cuda":
        for t in inputs:
            t.grad = None
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        once()
        sync(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return {"ms_forward_backward": statistics.median(times), "peak_mb": peak}


def kernel_parity(device: torch.device, tiny: bool, repeats: int) -> dict:
    from models.layers.ms_deform_attn_triton import ms_deform_attn_triton

    results = {}
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        value, shapes, locations, weights = attention_inputs(device, dtype, tiny)
        outputs, grads, speed = {}, {}, {}
        for backend, fn in (("pytorch", ms_deform_attn_sample), ("triton", ms_deform_attn_triton)):
            inputs = [t.detach().clone().requires_grad_(True) for t in (value, locations, weights)]
            out = fn(inputs[0], shapes, inputs[1], inputs[2])
            out.float().square().sum().backward()
            outputs[backend] = out.detach().float()
            grads[backend] = [t.grad.float() for t in inputs]
            speed[backend] = time_attention(fn, inputs, shapes, device, repeats)
        pairs = {"output": (outputs["triton"], outputs["pytorch"])}
        for name, a, b in zip(("value", "locations", "weights"), grads["triton"], grads["pytorch"], strict=True):
            pairs[f"grad_{name}"] = (a, b)
        results[dtype_name] = {
            **{f"max_abs_diff_{name}": float((a - b).abs().max()) for name, (a, b) in pairs.items()},
            # Relative to the largest grid_sample value: the location gradient scales with the map size (hundreds
            # at the tiny sizes), so float32 rounding alone leaves absolute differences near 1e-4 there.
            **{f"max_rel_diff_{name}": relative_difference(a, b) for name, (a, b) in pairs.items()},
            "attention": speed,
        }
        print(
            f"  {dtype_name}: output diff {results[dtype_name]['max_abs_diff_output']:.2e}, "
            + ", ".join(f"{b} {r['ms_forward_backward']:.2f} ms" for b, r in speed.items()),
            flush=True,
        )
    return results


def compose_config(k: int, backend: str, amp_dtype: str | None, tiny: bool):
    overrides = [
        "model=co_deformable_detr",
        f"model.num_aux_heads={k}",
        f"model.msda_backend={backend}",
        f"trainer.amp_dtype={amp_dtype or 'null'}",
        f"trainer.device={ARGS.device}",
        "trainer.batch_size=2",
    ]
    overrides += TINY if tiny else [f"{key}={value}" for key, value in PUBLISHED.items()]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def step_batch(device: torch.device, tiny: bool, seed: int = 0):
    height, width = TINY_IMAGE if tiny else IMAGE
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(2):
        images.append(torch.rand(3, height, width, generator=g))
        wh = (0.1 + 0.4 * torch.rand(6, 2, generator=g)) * torch.tensor([width, height])
        x1y1 = torch.rand(6, 2, generator=g) * (torch.tensor([width, height]) - wh)
        targets.append(
            {"boxes": torch.cat([x1y1, x1y1 + wh], 1), "labels": torch.randint(NUM_CLASSES, (6,), generator=g)}
        )
    return images, targets


def train_one(k: int, backend: str, amp_dtype: str | None, batch, device: torch.device, tiny: bool, steps, warmup):
    """Median seconds of `steps` Trainer.run_step calls (after `warmup`) and the peak memory (CUDA only)."""
    cfg = compose_config(k, backend, amp_dtype, tiny)
    tcfg = cfg.trainer
    torch.manual_seed(0)
    model = build_model(cfg.model, NUM_CLASSES).to(device).train()
    optimizer = build_optimizer(model, tcfg.optimizer)
    trainer = Trainer(
        model,
        None,
        optimizer,
        build_scheduler(optimizer, tcfg.max_iters, tcfg.scheduler),
        tcfg.max_iters,
        device,
        clip_grad_norm=tcfg.clip_grad_norm,
        amp_dtype=tcfg.amp_dtype,
    )
    run_steps(trainer, [batch], warmup)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = run_steps(trainer, [batch], steps)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return statistics.median(seconds), peak


def training_steps(device: torch.device, tiny: bool, steps: int, warmup: int, errors: list[str]) -> list[dict]:
    rows = []
    # On the device once, so that the steps time the training and not the copies.
    batch = to_device(step_batch(device, tiny), device)
    for k in (0, 2):
        for backend in ("pytorch", "triton"):
            for amp_dtype in (None, "bf16"):
                row = {"K": k, "backend": backend, "dtype": amp_dtype or "fp32", "seconds_per_step": None}
                row["peak_mb"] = None
                try:
                    row["seconds_per_step"], row["peak_mb"] = train_one(
                        k, backend, amp_dtype, batch, device, tiny, steps, warmup
                    )
                    print(f"  K={k} {backend:<8} {row['dtype']:<5} {row['seconds_per_step']:.3f} s/step", flush=True)
                except Exception:  # one configuration's failure must not cost the others' numbers
                    row["error"] = traceback.format_exc(limit=-6)
                    errors.append(f"training step K={k} {backend} {row['dtype']}: {row['error']}")
                    print(row["error"], flush=True)
                rows.append(row)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def short_pipeline(device: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        command = [
            sys.executable,
            str(ROOT / "run.py"),
            "experiment=smoke",
            f"trainer.device={device}",
            "trainer.max_iters=4",
            f"hydra.run.dir={tmp}/run",
            f"paths.output_dir={tmp}/outputs",
            f"paths.data_dir={tmp}/data",
        ]
        env = {**os.environ, "WANDB_MODE": "disabled"}
        env.pop("TRITON_INTERPRET", None)  # the pipeline picks its own attention backend (auto)
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        metrics = None
        path = Path(tmp) / "run" / "eval" / "metrics.json"
        if proc.returncode == 0 and path.is_file():
            metrics = {k: v for k, v in json.loads(path.read_text())["bbox"].items() if k != "per_class"}
        return {
            "returncode": proc.returncode,
            "seconds": seconds,
            "metrics": metrics,
            "stderr_tail": proc.stderr[-2000:],
        }


def write(report: dict) -> None:
    """After every part: a run stopped at its time limit still leaves what it measured."""
    ARGS.out.parent.mkdir(parents=True, exist_ok=True)
    ARGS.out.write_text(json.dumps(report, indent=2) + "\n")


def print_table(report: dict) -> None:
    for dtype, parity in report.get("kernel_parity", {}).items():
        rel = max(v for key, v in parity.items() if key.startswith("max_rel_diff_"))
        att = parity["attention"]
        memory = "  ".join(f"{b} {r['peak_mb']:.0f} MB" for b, r in att.items() if r["peak_mb"] is not None)
        times = "  ".join(f"{b} {r['ms_forward_backward']:.2f} ms" for b, r in att.items())
        print(f"attention {dtype}: largest relative difference {rel:.1e}; fwd+bwd {times}; peak {memory}")
    rows = report.get("training_steps", [])
    print(f"\n{'K':>2} {'backend':<8} {'dtype':<5} {'s/step':>8} {'peak MB':>9}")
    for row in rows:
        seconds = f"{row['seconds_per_step']:8.3f}" if row["seconds_per_step"] is not None else f"{'failed':>8}"
        peak = f"{row['peak_mb']:9.0f}" if row["peak_mb"] is not None else f"{'-':>9}"
        print(f"{row['K']:>2} {row['backend']:<8} {row['dtype']:<5} {seconds} {peak}")
    by = {(r["K"], r["backend"], r["dtype"]): r["seconds_per_step"] for r in rows}

    def ratio(a: tuple, b: tuple) -> str:
        return f"{by[a] / by[b]:.2f}x" if by.get(a) and by.get(b) else "n/a"

    for dtype in ("fp32", "bf16"):
        print(f"triton speed-up over grid_sample (K=0, {dtype}): {ratio((0, 'pytorch', dtype), (0, 'triton', dtype))}")
    print(f"K=2 / K=0 step time (triton, bf16): {ratio((2, 'triton', 'bf16'), (0, 'triton', 'bf16'))}")
    print(f"K=2 / K=0 step time (pytorch, fp32): {ratio((2, 'pytorch', 'fp32'), (0, 'pytorch', 'fp32'))}")
    if "pipeline" in report:
        pipe = report["pipeline"]
        print(f"pipeline: exit {pipe['returncode']}, {pipe['seconds']:.0f} s, {pipe['metrics']}")


def main() -> None:
    device = torch.device(ARGS.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device; use --device cpu --tiny for the dry run")
    steps, warmup, repeats = (1, 0, 1) if ARGS.tiny else (ARGS.steps, ARGS.warmup, 10)
    import triton

    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "tiny": ARGS.tiny,
        "errors": [],
    }
    errors = report["errors"]
    start = time.perf_counter()
    print("1. kernel parity", flush=True)
    try:
        report["kernel_parity"] = kernel_parity(device, ARGS.tiny, repeats)
    except Exception:
        errors.append(f"kernel parity: {traceback.format_exc(limit=-6)}")
        print(errors[-1], flush=True)
    write(report)
    print(f"2. training steps ({time.perf_counter() - start:.0f} s so far)", flush=True)
    report["training_steps"] = training_steps(device, ARGS.tiny, steps, warmup, errors)
    write(report)
    if not ARGS.skip_pipeline:
        print(f"3. short pipeline ({time.perf_counter() - start:.0f} s so far)", flush=True)
        report["pipeline"] = short_pipeline(ARGS.device)
        if report["pipeline"]["returncode"] != 0:
            errors.append(f"pipeline: {report['pipeline']['stderr_tail']}")
    report["seconds"] = time.perf_counter() - start
    write(report)
    print_table(report)
    print(f"written to {ARGS.out} ({report['seconds']:.0f} s)")
    if errors:
        sys.exit(f"{len(errors)} part(s) failed; the first: {errors[0]}")


if __name__ == "__main__":
    main()
