"""The one checkpoint writer and reader: atomic saves, resolving `init_from`, and load reports per module."""

from __future__ import annotations

import fnmatch
import hashlib
import pickle
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from stages.engine.files import atomic_write_bytes
from stages.errors import UserError

CHECKPOINT_NAME = "checkpoint.pth"
LAST_NAME = "last.pth"
# When init_from names a run directory, these stage sub-directories are searched, latest stage first.
STAGE_ORDER = ("finetune", "box_pretrain", "image_pretrain")
# Payload keys: the fingerprint of the stage that wrote the file, and the categories its class head predicts.
FINGERPRINT_KEY = "fingerprint"
CATEGORIES_KEY = "categories"


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write `payload` atomically. Every checkpoint of the pipeline goes through here, built by
    `checkpoint_payload`, so that it holds plain tensors and containers only and loads with weights_only=True."""
    atomic_write_bytes(path, lambda f: torch.save(payload, f))


def select_state(state: dict[str, torch.Tensor], prefix: str = "", rename: str = "") -> dict[str, torch.Tensor]:
    """The entries of `state` whose key starts with `prefix`, that prefix replaced by `rename`: the key filter that
    turns a training wrapper's state into a detector-only (`"detector."` -> `""`) or backbone-only
    (`"online_encoder."` -> `"backbone."`) checkpoint."""
    return {rename + key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def checkpoint_payload(
    model: dict[str, torch.Tensor],
    *,
    stage: str,
    iteration: int,
    config: dict,
    fingerprint: str | None,
    categories: list[dict] | None = None,
    **extra,
) -> dict:
    """The one checkpoint layout: `model` (a state dict), the stage that wrote it, its iteration, the resolved
    config as plain containers, the stage fingerprint, the dataset's categories (`[{"id", "name"}]`, contiguous
    label order) when the class head was trained on them, plus `extra` (optimizer, scheduler, rng, drop_keys...)."""
    payload = {"model": model, "stage": stage, "iter": int(iteration), "config": config, FINGERPRINT_KEY: fingerprint}
    if categories is not None:
        payload[CATEGORIES_KEY] = [{"id": int(c["id"]), "name": str(c["name"])} for c in categories]
    payload.update(extra)
    return payload


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


def _load_weights_only(path: Path, mmap: bool = False) -> object:
    """torch.load(weights_only=True) with every failure as one UserError line: a file that needs anything but
    tensors and plain containers unpickled is refused, since unpickling can run code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        first = next((line for line in str(err).splitlines() if "Unsupported global" in line), "")
        reason = f" ({first.strip()})" if first else ""
        raise UserError(
            f"{path}: refused: loading it would unpickle objects other than tensors and plain containers{reason}; "
            "expected a checkpoint written by this pipeline (foreign backbone weights: stage=image_pretrain "
            "stage.method=import)"
        ) from None
    except Exception as err:  # torch raises many types for a corrupt or foreign file
        message = " ".join(str(err).split())[:200]
        raise UserError(f"{path}: not a readable checkpoint ({type(err).__name__}: {message})") from None


def read_checkpoint(path: Path) -> dict:
    """Load a checkpoint on the CPU with weights_only=True; anything else gives a one-line UserError."""
    payload = _load_weights_only(path)
    if not isinstance(payload, dict) or "model" not in payload:
        raise UserError(f"{path}: checkpoint has no 'model' entry; expected a file written by this pipeline")
    return payload


def checkpoint_identity(path_or_dir: str | Path) -> dict:
    """What a stage started from, for its fingerprint: the fingerprint of the stage that wrote the checkpoint when
    it records one (the same weights from a recomputed stage keep their identity), else the file's sha256."""
    path = resolve_checkpoint(path_or_dir)
    if path.suffix == ".onnx":  # an exported model (stage=eval evaluates those too)
        return {"sha256": sha256_of(path)}
    payload = _load_weights_only(path, mmap=True)
    recorded = payload.get(FINGERPRINT_KEY) if isinstance(payload, dict) else None
    if isinstance(recorded, str) and recorded:
        return {"stage": payload.get("stage"), "fingerprint": recorded}
    return {"sha256": sha256_of(path)}


def module_of(key: str) -> str:
    """The top-level module a parameter belongs to (backbone, neck, transformer, heads...)."""
    return key.split(".", 1)[0]


@dataclass
class LoadReport:
    """What happened to each tensor when a checkpoint was loaded into a model, grouped by top-level module."""

    source: str
    # The stage that wrote the checkpoint and the categories its class head was trained on (None: not recorded).
    stage: str | None = None
    categories: list[dict] | None = None
    loaded: dict[str, int] = field(default_factory=dict)
    skipped_shape: dict[str, int] = field(default_factory=dict)
    skipped_name: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    fresh: dict[str, int] = field(default_factory=dict)
    # The patterns (`drop_matches`) whose tensors were left out: the caller's and the checkpoint's "drop_keys".
    drop_patterns: list[str] = field(default_factory=list)

    @property
    def num_loaded(self) -> int:
        return sum(self.loaded.values())

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "stage": self.stage,
            "loaded": self.loaded,
            "skipped_shape": self.skipped_shape,
            "skipped_name": self.skipped_name,
            "dropped": self.dropped,
            "fresh": self.fresh,
            "drop_patterns": self.drop_patterns,
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
        if self.drop_patterns:
            lines.append(f"dropped by: {', '.join(self.drop_patterns)}")
        return "\n".join(lines)


def _count(counter: dict[str, int], key: str) -> None:
    counter[module_of(key)] = counter.get(module_of(key), 0) + 1


def drop_matches(key: str, pattern: str) -> bool:
    """Whether a drop pattern selects a state-dict key: the pattern occurs in the key starting at a module name
    (the key's start or after a "."), where `*` matches any run of characters. "class_embed." drops every decoder
    layer's classifier but not "enc_class_embed.weight"; "bbox_embed.*.6." the last Linear of every layer's box
    MLP; "tower.cls_pred." that of "aux_heads.0.tower.cls_pred.bias"."""
    return fnmatch.fnmatchcase(key, f"{pattern}*") or fnmatch.fnmatchcase(key, f"*.{pattern}*")


def load_state_into(
    model: nn.Module, state: dict[str, torch.Tensor], source: str, drop: Iterable[str] = ()
) -> LoadReport:
    """Copy every tensor whose name and shape fit; report the rest. Keys a `drop` pattern matches (`drop_matches`)
    are left out."""
    drop = list(dict.fromkeys(drop))
    report = LoadReport(source=source, drop_patterns=drop)
    target = model.state_dict()
    usable = {}
    for key, value in state.items():
        if any(drop_matches(key, d) for d in drop):
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


def load_into(
    model: nn.Module,
    path_or_dir: str | Path,
    drop: Iterable[str] = (),
    min_loaded: int = 1,
    checkpoint_drops: bool = True,
) -> LoadReport:
    """Load `init_from` weights into `model`, leaving out keys a `drop` pattern matches or one the checkpoint lists
    under "drop_keys" (`drop_matches`; `checkpoint_drops=False` loads those too, to measure the checkpoint itself);
    a checkpoint that fits nothing gives a UserError."""
    path = resolve_checkpoint(path_or_dir)
    payload = read_checkpoint(path)
    # A pre-training stage lists what must not go on (projectors, pseudo-classifiers) as "drop_keys".
    drop = (*drop, *(payload.get("drop_keys", []) if checkpoint_drops else []))
    report = load_state_into(model, payload["model"], str(path), drop)
    report.stage = payload.get("stage")
    report.categories = payload.get(CATEGORIES_KEY)
    if report.num_loaded < min_loaded:
        raise UserError(
            f"{path}: none of its {len(payload['model'])} tensors fit the model "
            f"(stage {payload.get('stage', '?')!r}); expected a checkpoint of this architecture"
        )
    return report
