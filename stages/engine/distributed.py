"""torch.distributed set-up for runs launched by torchrun (single process otherwise)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from stages.errors import UserError

T = TypeVar("T")


def export_slurm_environment() -> None:
    """Under Hydra's submitit launcher each Slurm task is one rank; submitit translates the SLURM_* variables
    into the RANK / WORLD_SIZE / MASTER_ADDR variables torch.distributed reads (torchrun sets them itself)."""
    if "WORLD_SIZE" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    try:
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError:  # not launched by submitit (e.g. a plain srun of torchrun)
        return
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def init_distributed(device: str, backend: str = "auto") -> torch.device:
    """Join the process group torchrun (or submitit on Slurm) describes and return this rank's device."""
    export_slurm_environment()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"trainer.device: {device!r}, but torch sees no CUDA device here; expected trainer.device=cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    if device.startswith("cuda"):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(device)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def main_process_first(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` on the main process first, then on the other ranks: for a cache that the main process
    writes and the others then read."""
    if is_main_process():
        result = fn(*args, **kwargs)
    barrier()
    if not is_main_process():
        result = fn(*args, **kwargs)
    return result


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Average scalar logs across ranks so rank 0 logs the global value."""
    if not is_distributed() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    t /= world_size()
    return dict(zip(keys, t.tolist(), strict=True))


def broadcast_object(obj: object) -> object:
    """Rank 0's `obj` on every rank (a decision only rank 0 can make, such as reusing a stored stage)."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_gather_object(obj: object) -> list:
    """Every rank's `obj`, in rank order ([obj] in a single process)."""
    if not is_distributed():
        return [obj]
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
