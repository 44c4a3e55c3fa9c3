"""Training-step speed and memory: our Deformable-DETR against Hugging Face `transformers`' DeformableDetr.

    python benchmarks/train_step.py [--device cpu|cuda] [--depth 18|50] [--d-model N] [--layers N]
        [--queries N] [--ffn N] [--height H] [--width W] [--batch B] [--steps N] [--warmup N]
        [--threads N] [--amp] [--profile N] [hydra overrides of our model, e.g. model.detector.transformer.num_points=2]

Both models are built in this one process at the same configuration, read from our config (`model=deformable_detr`
plus the flags above): ResNet depth, d_model, encoder/decoder layers, FFN width, heads, points, feature levels,
queries, box refinement, two-stage, dropout, matcher costs. Both backbones are the same network: a ResNet with
frozen BatchNorm and every convolution trained (transformers 5.x builds its default timm ResNet that way, so
ours runs with `norm=frozen_bn frozen_stages=0`), randomly initialised (no downloads). Both get the same images
and targets (`--boxes` random boxes per image) and compute the focal + L1 + GIoU set losses on every decoder
layer (HF: `auxiliary_loss=True`). One known difference: with box refinement transformers 5.x ties its per-layer
class heads into one Linear (d_model x K + K parameters per extra layer fewer); the compute is the same.

One step is our trainer's: `stages.engine.trainer.Trainer.run_step`, one Trainer per model with its own forward
(ours: images and targets; HF's: normalised pixels and cxcywh targets, its summed loss), the config's AdamW and
schedule (`trainer.optimizer`, `trainer.scheduler`) and gradient clipping (`trainer.clip_grad_norm`): forward (with
--amp: `amp_dtype=fp16`, autocast and loss scaling, on CUDA; `bf16` on CPU) + sum of losses + backward + clipping +
AdamW and schedule step. After `--warmup` steps each, the models take timed steps in turn (ours, HF, ours, ...), so
load from other processes on the machine hits both alike; images/s = batch / median step time.

Memory, per model:
- state MB: parameters, buffers and AdamW state (resident between steps), counted from the tensors.
- step peak MB: the most tensor memory allocated during one step above what was allocated when it started
  (activations kept for backward, gradients, temporaries). CUDA: `torch.cuda.max_memory_allocated`. CPU: the
  running sum of the allocation and free events that `torch.profiler(profile_memory=True)` records for one
  extra, untimed step -- bytes of tensor storage from torch's CPU allocator, not the process RSS (which glibc
  caching and shared libraries blur).
- peak MB = state + step peak.

--profile N: also run N profiled steps of each model and print the top operators by self CPU (and CUDA) time;
on CUDA also the wall time per step against its summed kernel time and its host syncs.

Requires the `bench` extra (`pip install -e .[bench]`: transformers and timm); neither is a runtime dependency.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch import Tensor, nn

from stages.build import build_model
from stages.engine.optim import build_optimizer, build_scheduler
from stages.engine.trainer import LossDict, Trainer, compile_modules, detection_forward, run_steps
from stages.errors import UserError

if TYPE_CHECKING:
    from transformers import DeformableDetrConfig

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"
MB = 2**20
# transformers hard-codes the GroupNorm groups of its input projection (our neck reads them from the config).
HF_NECK_GROUPS = 32


Batch = tuple[list[Tensor], list[dict[str, Tensor]]]


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Flags (None = our config's value) and the remaining Hydra overrides of our model config."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--depth", type=int, default=None, help="ResNet depth, 18 or 50 (default: our config)")
    p.add_argument("--d-model", type=int, default=None, help="transformer width (default: our config)")
    p.add_argument("--layers", type=int, default=None, help="encoder and decoder layers each (default: our config)")
    p.add_argument("--queries", type=int, default=None, help="object queries (default: our config)")
    p.add_argument("--ffn", type=int, default=None, help="FFN hidden width (default: our config)")
    p.add_argument("--height", type=int, default=192, help="image height (pixels)")
    p.add_argument("--width", type=int, default=256, help="image width (pixels)")
    p.add_argument("--batch", type=int, default=None, help="images per step (default: trainer.batch_size)")
    p.add_argument("--boxes", type=int, default=4, help="random target boxes per image")
    p.add_argument("--steps", type=int, default=20, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument(
        "--amp", action="store_true", help="mixed precision: float16 + loss scaling on CUDA, bfloat16 on CPU"
    )
    p.add_argument("--profile", type=int, default=0, help="profiled steps per model after timing (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--compile", action="store_true", help="torch.compile our model's trainer.compile_modules (as trainer.compile)"
    )
    return p.parse_known_args(argv)


def compose_config(args: argparse.Namespace, extra: list[str]) -> DictConfig:
    """Our full config with the benchmark's sizes applied and the backbone made equal to HF's."""
    overrides = [
        "model=deformable_detr",
        "model.detector.backbone.norm=frozen_bn",
        "model.detector.backbone.frozen_stages=0",
    ]
    optional = {
        "model.detector.backbone.depth": args.depth,
        "model.d_model": args.d_model,
        "model.detector.transformer.num_encoder_layers": args.layers,
        "model.detector.transformer.num_decoder_layers": args.layers,
        "model.num_queries": args.queries,
        "model.detector.transformer.dim_feedforward": args.ffn,
        "trainer.batch_size": args.batch,
    }
    overrides += [f"{key}={value}" for key, value in optional.items() if value is not None]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="config", overrides=[*overrides, *extra])


def make_batch(
    num_images: int, height: int, width: int, boxes_per_image: int, num_classes: int, seed: int
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Noise images in [0, 1] and random xyxy pixel boxes (at least an eighth of each side) with random labels."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(num_images):
        images.append(torch.rand(3, height, width, generator=g))
        size = torch.tensor([width, height], dtype=torch.float32)
        wh = (0.125 + 0.5 * torch.rand(boxes_per_image, 2, generator=g)) * size
        x1y1 = torch.rand(boxes_per_image, 2, generator=g) * (size - wh)
        labels = torch.randint(num_classes, (boxes_per_image,), generator=g)
        targets.append({"boxes": torch.cat([x1y1, x1y1 + wh], 1), "labels": labels})
    return images, targets


def _whole(value: float, key: str) -> int:
    """transformers types its matcher costs and loss weights as integers."""
    if float(value) != int(value):
        raise UserError(f"model.detector.criterion.{key}: {value}; transformers takes whole numbers, expected one")
    return int(value)


def hf_config(cfg: DictConfig, num_classes: int) -> DeformableDetrConfig:
    """A transformers DeformableDetrConfig equal to our model config (timm ResNet backbone, random weights)."""
    try:
        import timm  # noqa: F401  (transformers builds its default ResNet backbone with timm)
        from transformers import DeformableDetrConfig
    except ImportError as err:
        raise UserError(
            f"benchmarks/train_step.py: {err.name} is missing; expected the bench extra (pip install -e .[bench])"
        ) from err
    det = cfg.model.detector
    tr = det.transformer
    crit = det.criterion
    if det.get("mixed_query_selection") or det.get("look_forward_twice"):
        raise UserError(
            "model.detector: mixed_query_selection and look_forward_twice have no transformers equivalent; expected both false"
        )
    if det.neck.num_groups != HF_NECK_GROUPS:
        raise UserError(
            f"model.detector.neck.num_groups: {det.neck.num_groups}; transformers fixes {HF_NECK_GROUPS}, expected the same"
        )
    return DeformableDetrConfig(
        backbone=f"resnet{det.backbone.depth}",
        use_timm_backbone=True,
        use_pretrained_backbone=False,
        d_model=cfg.model.d_model,
        encoder_layers=tr.num_encoder_layers,
        decoder_layers=tr.num_decoder_layers,
        encoder_ffn_dim=tr.dim_feedforward,
        decoder_ffn_dim=tr.dim_feedforward,
        encoder_attention_heads=tr.num_heads,
        decoder_attention_heads=tr.num_heads,
        encoder_n_points=tr.num_points,
        decoder_n_points=tr.num_points,
        num_feature_levels=cfg.model.num_feature_levels,
        num_queries=cfg.model.num_queries,
        two_stage=det.two_stage,
        two_stage_num_proposals=cfg.model.num_queries,
        with_box_refine=det.with_box_refine,
        dropout=tr.dropout,
        attention_dropout=tr.dropout,
        activation_dropout=tr.dropout,
        auxiliary_loss=True,
        focal_alpha=crit.focal_alpha,
        class_cost=_whole(crit.matcher.cost_class, "matcher.cost_class"),
        bbox_cost=_whole(crit.matcher.cost_bbox, "matcher.cost_bbox"),
        giou_cost=_whole(crit.matcher.cost_giou, "matcher.cost_giou"),
        bbox_loss_coefficient=_whole(crit.loss_bbox, "loss_bbox"),
        giou_loss_coefficient=_whole(crit.loss_giou, "loss_giou"),
        id2label={i: f"class{i}" for i in range(num_classes)},
        # The pure-PyTorch (grid_sample) attention, like ours: no compiled or Hub kernels.
        disable_custom_kernels=True,
    )


def amp_dtype(device: torch.device, amp: bool) -> str | None:
    """--amp as our trainer's `trainer.amp_dtype`: float16 with loss scaling on CUDA; CPU autocast only runs
    bfloat16 at a useful speed."""
    if not amp:
        return None
    return "fp16" if device.type == "cuda" else "bf16"


def build_trainers(
    cfg: DictConfig, num_classes: int, device: torch.device, amp: bool, seed: int, compile: bool = False
) -> list[Trainer]:
    """Ours (from `cfg.model`) and HF's (from the equal DeformableDetrConfig), each in a Trainer with the config's
    optimizer, schedule and clipping; only `run_step` is used, so neither has a loader."""
    from torchvision.ops import box_convert
    from transformers import DeformableDetrForObjectDetection

    torch.manual_seed(seed)
    ours = build_model(cfg.model, num_classes).to(device).train()
    if compile:
        compile_modules(ours, list(cfg.trainer.compile_modules))

    torch.manual_seed(seed)
    hf = DeformableDetrForObjectDetection(hf_config(cfg, num_classes)).to(device).train()
    mean = torch.tensor(list(cfg.model.detector.pixel_mean), device=device).view(1, -1, 1, 1)
    std = torch.tensor(list(cfg.model.detector.pixel_std), device=device).view(1, -1, 1, 1)

    def hf_forward(model: nn.Module, batch: Batch, device: torch.device) -> LossDict:
        # The same preprocessing ours does inside forward: normalise, batch, pixel targets -> normalised cxcywh.
        images, targets = batch
        pixels = (torch.stack(images) - mean) / std
        pixel_mask = torch.ones(pixels.shape[0], *pixels.shape[2:], dtype=torch.long, device=device)
        scale = torch.tensor([pixels.shape[3], pixels.shape[2]] * 2, dtype=torch.float32, device=device)
        labels = [
            {"class_labels": t["labels"], "boxes": box_convert(t["boxes"] / scale, "xyxy", "cxcywh")} for t in targets
        ]
        return {"loss": model(pixel_values=pixels, pixel_mask=pixel_mask, labels=labels).loss}

    tcfg = cfg.trainer
    trainers = []
    for name, model, forward in (("ours", ours, detection_forward), ("transformers", hf, hf_forward)):
        optimizer = build_optimizer(model, tcfg.optimizer)
        trainers.append(
            Trainer(
                model,
                None,
                optimizer,
                build_scheduler(optimizer, tcfg.max_iters, tcfg.scheduler),
                tcfg.max_iters,
                device,
                forward_fn=forward,
                clip_grad_norm=tcfg.clip_grad_norm,
                amp_dtype=amp_dtype(device, amp),
                name=name,
            )
        )
    return trainers


def time_steps(trainers: list[Trainer], batch: Batch, warmup: int, steps: int) -> dict[str, list[float]]:
    """Seconds of each timed step per model; the models take their timed steps in turn."""
    for trainer in trainers:
        run_steps(trainer, [batch], warmup)
    seconds: dict[str, list[float]] = {trainer.name: [] for trainer in trainers}
    for _ in range(steps):
        for trainer in trainers:
            seconds[trainer.name] += run_steps(trainer, [batch], 1)
    return seconds


def state_bytes(trainer: Trainer) -> int:
    """Parameters, buffers and optimizer state: what stays allocated between steps."""
    tensors = [*trainer.model.parameters(), *trainer.model.buffers()]
    tensors += [v for state in trainer.optimizer.state.values() for v in state.values() if isinstance(v, Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def step_peak_bytes(trainer: Trainer, batch: Batch) -> int:
    """Peak tensor memory of one step above the allocation at its start (see the module docstring)."""
    device = trainer.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        run_steps(trainer, [batch], 1)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.run_step(batch)
    # Allocation (+) and free (-) events in time order; the running sum is the memory allocated since the start.
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def profile_ops(trainer: Trainer, batch: Batch, steps: int, rows: int) -> str:
    """The top operators of `steps` steps by self CPU time; on a GPU also by self CUDA time, and per step the wall
    time against the summed kernel time (a step whose kernels fill little of its wall time waits on the host)."""
    from torch.profiler import ProfilerActivity, profile

    on_cuda = trainer.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        seconds = run_steps(trainer, [batch], steps)
    averages = prof.key_averages()
    tables = [averages.table(sort_by="self_cpu_time_total", row_limit=rows)]
    if on_cuda:
        tables.append(averages.table(sort_by="self_cuda_time_total", row_limit=rows))
        events = prof.events()
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        kernel_ms = sum(e.time_range.elapsed_us() for e in kernels) / 1000
        syncs = sum(e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize") for e in events)
        tables.append(
            f"per step (profiled, so slower): {1000 * sum(seconds) / steps:.1f} ms wall, {kernel_ms / steps:.1f} ms "
            f"of CUDA kernels summed ({len(kernels) / steps:.0f} kernels), {syncs / steps:.0f} host syncs"
        )
    return "\n".join(tables)


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank q-quantile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def measure(trainers: list[Trainer], batch: Batch, warmup: int, steps: int) -> dict[str, dict]:
    """Per model: params, images/s, median and p10/p90 step seconds, state / step peak / peak bytes."""
    seconds = time_steps(trainers, batch, warmup, steps)
    num_images = len(batch[0])
    stats = {}
    for trainer in trainers:
        median = statistics.median(seconds[trainer.name])
        state = state_bytes(trainer)
        step_peak = step_peak_bytes(trainer, batch)
        stats[trainer.name] = {
            "params": sum(p.numel() for p in trainer.model.parameters()),
            "ips": num_images / median,
            "ms": 1000 * median,
            "p10": 1000 * percentile(seconds[trainer.name], 0.1),
            "p90": 1000 * percentile(seconds[trainer.name], 0.9),
            "state": state,
            "step_peak": step_peak,
            "peak": state + step_peak,
        }
    return stats


def print_table(stats: dict[str, dict]) -> None:
    """One row per model, then the ratios ours / HF (images/s above 1 and memory below 1 favour ours)."""
    columns = ["model", "params M", "images/s", "step ms (median)", "step ms (p10-p90)", "state MB", "step peak MB"]
    columns.append("peak MB")
    rows = [
        [
            name,
            f"{s['params'] / 1e6:.2f}",
            f"{s['ips']:.2f}",
            f"{s['ms']:.1f}",
            f"{s['p10']:.0f}-{s['p90']:.0f}",
            f"{s['state'] / MB:.1f}",
            f"{s['step_peak'] / MB:.1f}",
            f"{s['peak'] / MB:.1f}",
        ]
        for name, s in stats.items()
    ]
    ours, hf = stats["ours"], stats["transformers"]
    ratios = [f"{ours[key] / hf[key]:.3f}" for key in ("ips", "ms", "state", "step_peak", "peak")]
    rows.append(["ours / HF", "", *ratios[:2], "", *ratios[2:]])
    widths = [max(len(col), *(len(r[i]) for r in rows)) for i, col in enumerate(columns)]
    print("| " + " | ".join(f"{col:<{w}}" for col, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(
            "| "
            + " | ".join(f"{cell:<{w}}" if i == 0 else f"{cell:>{w}}" for i, (cell, w) in enumerate(zip(r, widths)))
            + " |"
        )


def main(argv: list[str]) -> None:
    args, extra = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    cfg = compose_config(args, extra)
    num_classes = len(cfg.data.generator.classes)
    batch = cfg.trainer.batch_size
    images, targets = make_batch(batch, args.height, args.width, args.boxes, num_classes, args.seed)
    # On the device once, so that the steps time the training and not the copies.
    batch_on_device = ([img.to(device) for img in images], [{k: v.to(device) for k, v in t.items()} for t in targets])
    trainers = build_trainers(cfg, num_classes, device, args.amp, args.seed, args.compile)
    stats = measure(trainers, batch_on_device, args.warmup, args.steps)

    det = cfg.model.detector
    tr = det.transformer
    print(
        f"\nDeformable-DETR train step on {args.device} ({torch.get_num_threads()} threads, amp={args.amp}, "
        f"compile={args.compile}): "
        f"R{det.backbone.depth}, d_model {cfg.model.d_model}, {tr.num_encoder_layers}+{tr.num_decoder_layers} layers, "
        f"FFN {tr.dim_feedforward}, {tr.num_heads} heads, {tr.num_points} points, {cfg.model.num_feature_levels} levels, "
        f"{cfg.model.num_queries} queries, box_refine={det.with_box_refine}, two_stage={det.two_stage}, "
        f"{args.height}x{args.width}, batch {batch}, {args.boxes} boxes/image; {args.warmup} warmup + {args.steps} timed steps each"
    )
    print_table(stats)
    if args.profile:
        for trainer in trainers:
            print(f"\nprofile: {trainer.name}, {args.profile} steps")
            print(profile_ops(trainer, batch_on_device, args.profile, rows=25))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as err:
        sys.exit(f"error: {err}")
