"""The one checkpoint writer and reader: atomic saves, resolving `init_from`, and load reports per module."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from stages.errors import UserError

CHECKPOINT_NAME = "checkpoint.pth"
LAST_NAME = "last.pth"
# When init_from names a run directory, these stage sub-directories are searched, latest stage first.
STAGE_ORDER = ("finetune", "box_pretrain", "image_pretrain")


def atomic_write_bytes(path: Path, write) -> None:
    """Call `write(file_object)` on a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")))


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write `payload` (model, optimizer, scheduler, iter, stage, config) atomically."""
    atomic_write_bytes(path, lambda f: torch.save(payload, f))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_checkpoint(path_or_dir: str | Path) -> Path:
    """A checkpoint file from a file path, a stage directory, or a run directory holding stage directories."""
    path = Path(path_or_dir)
    if path.is_file():
        return path
    if path.is_dir():
        if (path / CHECKPOINT_NAME).is_file():
            return path / CHECKPOINT_NAME
        for stage in STAGE_ORDER:
            if (path / stage / CHECKPOINT_NAME).is_file():
                return path / stage / CHECKPOINT_NAME
        raise UserError(f"{path}: no {CHECKPOINT_NAME} in this directory or its stage directories {STAGE_ORDER}")
    raise UserError(f"{path}: checkpoint not found; expected a checkpoint file or a stage output directory")


def read_checkpoint(path: Path) -> dict:
    """Load a checkpoint on the CPU; a file that is not one gives a UserError."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for a corrupt or foreign file
        raise UserError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or "model" not in payload:
        raise UserError(f"{path}: checkpoint has no 'model' entry; expected a file written by this pipeline")
    return payload


def module_of(key: str) -> str:
    """The top-level module a parameter belongs to (backbone, neck, transformer, heads...)."""
    return key.split(".", 1)[0]


@dataclass
class LoadReport:
    """What happened to each tensor when a checkpoint was loaded into a model, grouped by top-level module."""

    source: str
    loaded: dict[str, int] = field(default_factory=dict)
    skipped_shape: dict[str, int] = field(default_factory=dict)
    skipped_name: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    fresh: dict[str, int] = field(default_factory=dict)

    @property
    def num_loaded(self) -> int:
        return sum(self.loaded.values())

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "loaded": self.loaded,
            "skipped_shape": self.skipped_shape,
            "skipped_name": self.skipped_name,
            "dropped": self.dropped,
            "fresh": self.fresh,
        }

    def table(self) -> str:
        modules = sorted(
            set(self.loaded) | set(self.skipped_shape) | set(self.skipped_name) | set(self.fresh) | set(self.dropped)
        )
        lines = [
            f"init from {self.source}",
            f"{'module':<24}{'loaded':>8}{'shape':>8}{'name':>8}{'dropped':>9}{'fresh':>8}",
        ]
        for m in modules:
            lines.append(
                f"{m:<24}{self.loaded.get(m, 0):>8}{self.skipped_shape.get(m, 0):>8}"
                f"{self.skipped_name.get(m, 0):>8}{self.dropped.get(m, 0):>9}{self.fresh.get(m, 0):>8}"
            )
        return "\n".join(lines)


def _count(counter: dict[str, int], key: str) -> None:
    counter[module_of(key)] = counter.get(module_of(key), 0) + 1


def load_state_into(
    model: nn.Module, state: dict[str, torch.Tensor], source: str, drop: Iterable[str] = ()
) -> LoadReport:
    """Copy every tensor whose name and shape fit; report the rest. Keys containing a `drop` substring are left out."""
    report = LoadReport(source=source)
    target = model.state_dict()
    drop = tuple(drop)
    usable = {}
    for key, value in state.items():
        if any(d in key for d in drop):
            _count(report.dropped, key)
        elif key not in target:
            _count(report.skipped_name, key)
        elif tuple(value.shape) != tuple(target[key].shape):
            _count(report.skipped_shape, key)
        else:
            usable[key] = value
            _count(report.loaded, key)
    for key in target:
        if key not in usable:
            _count(report.fresh, key)
    model.load_state_dict(usable, strict=False)
    return report


def load_into(model: nn.Module, path_or_dir: str | Path, drop: Iterable[str] = (), min_loaded: int = 1) -> LoadReport:
    """Load `init_from` weights into `model`, leaving out keys with a `drop` substring or one the checkpoint lists
    under "drop_keys"; a checkpoint that fits nothing gives a UserError."""
    path = resolve_checkpoint(path_or_dir)
    payload = read_checkpoint(path)
    # A pre-training stage lists what must not go on (projectors, pseudo-classifiers) as "drop_keys".
    drop = (*drop, *payload.get("drop_keys", []))
    report = load_state_into(model, payload["model"], str(path), drop)
    if report.num_loaded < min_loaded:
        raise UserError(
            f"{path}: none of its {len(payload['model'])} tensors fit the model "
            f"(stage {payload.get('stage', '?')!r}); expected a checkpoint of this architecture"
        )
    return report
