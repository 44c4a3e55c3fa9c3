"""Import a ResNet backbone from a file in one of the common formats, mapping its names to torchvision's.

Formats recognised (the names after mapping are torchvision ResNet names: `conv1.weight`, `bn1.running_mean`,
`layer1.0.conv1.weight`, `layer1.0.downsample.1.weight`; the classifier `fc.*` is dropped):

- a torchvision ResNet `state_dict`, bare or wrapped under "state_dict" / "model";
- a timm ResNet checkpoint (timm's ResNet names equal torchvision's; a training checkpoint wraps them under
  "state_dict" and, with model EMA, "state_dict_ema", which is preferred as timm itself does);
- a detectron2 model-zoo `.pkl` (a pickle of `{"model": {name: numpy array}, "__author__": ...}` or a flat dict)
  or a detectron2 `.pth`, with detectron2's names (`stem.conv1.norm.weight`, `res2.0.shortcut.weight`), possibly
  under a prefix such as `backbone.bottom_up.`;
- self-supervised checkpoints whose encoder sits under a prefix: MoCo v2 (`module.encoder_q.`), MoCo v3
  (`module.base_encoder.`), BYOL-style (`online_network.`, `online_encoder.`), or any other prefix such as
  `backbone.`, `encoder.`, `module.`, `backbone.body.` (this pipeline's own checkpoints). Momentum/target copies
  (`encoder_k`, `momentum_encoder`, `target_*`) are never chosen.

`load_into_backbone` checks names and shapes against the backbone and refuses a file that fills too little of
it, or whose ResNet depth differs from the backbone's, with a `UserError` naming the file and its format.
"""

from __future__ import annotations

import argparse
import collections
import logging
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stages.errors import UserError

log = logging.getLogger("detpipe")

StateDict = dict[str, torch.Tensor]

# Wrapper keys searched, in order, when the file is a dict that is not itself a state dict. timm prefers the
# EMA weights of a training checkpoint, so "state_dict_ema" comes before "state_dict".
WRAPPER_KEYS = ("state_dict_ema", "state_dict", "model", "model_state", "online_network_state_dict", "network")
# Prefixes holding a momentum (target) copy of the encoder: the online copy is the one to import.
TARGET_MARKERS = ("encoder_k", "momentum_encoder", "target_network", "target_encoder", "target_backbone")
# (blocks in layer1..layer4, bottleneck blocks?) -> the torchvision ResNet with that layout.
RESNET_LAYOUTS = {
    ((2, 2, 2, 2), False): "resnet18",
    ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50",
    ((3, 4, 23, 3), True): "resnet101",
    ((3, 8, 36, 3), True): "resnet152",
}
DETECTRON2_STAGES = {"res2": "layer1", "res3": "layer2", "res4": "layer3", "res5": "layer4"}
# numpy globals a detectron2 pickle needs; anything else in a .pkl is refused unless allow_pickle is set.
NUMPY_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
}


@dataclass
class MappedWeights:
    """A file's backbone tensors under torchvision names, and how they were found."""

    state: StateDict
    format_name: str
    # Where in the file the tensors were: the wrapper key ("" for a bare dict) and the stripped prefix.
    wrapper: str = ""
    prefix: str = ""
    dropped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class ImportReport:
    """What `load_into_backbone` did with each backbone tensor (num_batches_tracked and fc.* are not counted)."""

    path: str
    format_name: str
    total: int
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    # (name, shape in the file, shape in the backbone)
    shape_mismatches: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "path": self.path,
            "format": self.format_name,
            "total": self.total,
            "loaded": len(self.loaded),
            "missing": self.missing,
            "unexpected": self.unexpected,
            "shape_mismatches": [[n, list(a), list(b)] for n, a, b in self.shape_mismatches],
            "dropped": len(self.dropped),
            "warnings": self.warnings,
        }

    def summary(self, max_names: int = 5) -> str:
        """A few lines for the console: counts, then the first `max_names` names of each problem."""

        def names(items: list) -> str:
            more = f" (+{len(items) - max_names} more)" if len(items) > max_names else ""
            return ", ".join(str(i) for i in items[:max_names]) + more

        lines = [
            f"backbone import from {self.path} ({self.format_name}): loaded {len(self.loaded)} of {self.total} "
            f"tensors, missing {len(self.missing)}, shape mismatches {len(self.shape_mismatches)}, "
            f"unexpected {len(self.unexpected)}, classifier tensors dropped {len(self.dropped)}"
        ]
        if self.missing:
            lines.append(f"  missing: {names(self.missing)}")
        if self.shape_mismatches:
            shapes = [f"{n} file {list(a)} vs backbone {list(b)}" for n, a, b in self.shape_mismatches]
            lines.append(f"  shape mismatches: {names(shapes)}")
        if self.unexpected:
            lines.append(f"  unexpected: {names(self.unexpected)}")
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)


# --- reading the file ------------------------------------------------------------------------------------------
class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles containers of numpy arrays (detectron2's .pkl) and refuses any other Python object."""

    def find_class(self, module: str, name: str):
        if (module, name) in NUMPY_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing Python object {module}.{name}")


def _read_file(path: Path, allow_pickle: bool) -> object:
    """The file's top-level object. torch files go through torch.load(weights_only=True); plain pickles through
    an unpickler that admits only numpy arrays. `allow_pickle` lifts both restrictions (trusted files only)."""
    if not path.is_file():
        raise UserError(f"{path}: weights file not found; expected a .pth/.pt/.pth.tar/.pkl backbone checkpoint")
    hint = "set stage.allow_pickle=true only if you trust this file"
    if not zipfile.is_zipfile(path):
        try:
            with open(path, "rb") as f:
                if allow_pickle:
                    obj = pickle.load(f, encoding="latin1")
                else:
                    # latin1: detectron2's model-zoo files were partly written by Python 2.
                    obj = _NumpyOnlyUnpickler(f, encoding="latin1").load()
        except pickle.UnpicklingError as err:
            if "refusing Python object" in str(err):
                raise UserError(f"{path}: pickle holds more than arrays ({err}); {hint}") from None
            raise UserError(f"{path}: not a readable pickle or torch file ({err})") from None
        except (EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as err:
            raise UserError(f"{path}: not a readable pickle or torch file ({type(err).__name__}: {err})") from None
        # A torch file in the legacy (non-zip) format starts with torch's magic number.
        if not (isinstance(obj, int) and obj == torch.serialization.MAGIC_NUMBER):
            return obj
    try:
        # timm training checkpoints carry their argparse arguments; a Namespace holds only plain values.
        with torch.serialization.safe_globals([argparse.Namespace, collections.OrderedDict]):
            return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[-1][:200]
        raise UserError(f"{path}: torch.load(weights_only=True) refused it ({reason}); {hint}") from None
    except Exception as err:  # torch raises many types for a corrupt or foreign file
        raise UserError(f"{path}: not a readable torch file ({type(err).__name__}: {err})") from None


def _is_array(value: object) -> bool:
    return isinstance(value, torch.Tensor | np.ndarray)


def _looks_like_state_dict(obj: object) -> bool:
    if not isinstance(obj, dict) or not obj:
        return False
    arrays = sum(_is_array(v) for v in obj.values())
    return arrays > 0 and arrays >= len(obj) / 2


def _unwrap(obj: object, path: Path) -> tuple[dict, str, dict]:
    """(the dict of arrays, the wrapper key path that led to it, the top-level metadata such as __author__)."""
    if not isinstance(obj, dict):
        raise UserError(f"{path}: holds a {type(obj).__name__}; expected a dict of tensors (a state_dict)")
    meta = {k: v for k, v in obj.items() if not isinstance(v, dict) and not _is_array(v)}
    wrapper = []
    for _ in range(3):  # a state dict can sit a few wrappers deep, e.g. {"model": {"state_dict": ...}}
        if _looks_like_state_dict(obj):
            break
        key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), dict) and obj[k]), None)
        if key is None:
            break
        wrapper.append(key)
        obj = obj[key]
    if not _looks_like_state_dict(obj):
        raise UserError(
            f"{path}: found no tensors (top-level keys {sorted(map(str, obj))[:8]}); expected a state_dict, "
            f"possibly under one of {list(WRAPPER_KEYS)}"
        )
    arrays = {str(k): v for k, v in obj.items() if _is_array(v)}
    return arrays, ".".join(wrapper), meta


# --- names ---------------------------------------------------------------------------------------------------
def _torchvision_root(parts: list[str]) -> int | None:
    """Index of the first name part where a torchvision ResNet name starts (conv1, bn1, fc, layerN.i)."""
    for i, part in enumerate(parts[:-1]):
        if part in ("conv1", "bn1", "fc"):
            return i
        if re.fullmatch(r"layer[1-4]", part) and parts[i + 1].isdigit():
            return i
    return None


def _detectron2_root(parts: list[str]) -> int | None:
    """Index of the first name part where a detectron2 ResNet name starts (stem.conv1, resN.i, linear)."""
    for i, part in enumerate(parts[:-1]):
        if part == "stem" and parts[i + 1] == "conv1":
            return i
        if re.fullmatch(r"res[2-5]", part) and parts[i + 1].isdigit():
            return i
        if part == "linear" and i == len(parts) - 2:
            return i
    return None


def _group_by_prefix(keys: list[str], root) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for key in keys:
        parts = key.split(".")
        i = root(parts)
        if i is not None:
            groups.setdefault(".".join(parts[:i]) + ("." if i else ""), []).append(key)
    return groups


def _detectron2_to_torchvision(name: str) -> str | None:
    """`res2.0.conv1.norm.weight` -> `layer1.0.bn1.weight` etc.; None for a name with no torchvision twin."""
    m = re.fullmatch(r"stem\.conv1\.(weight|norm\.(\w+))", name)
    if m:
        return "conv1.weight" if m.group(1) == "weight" else f"bn1.{m.group(2)}"
    m = re.fullmatch(r"(res[2-5])\.(\d+)\.(conv[1-3]|shortcut)\.(weight|norm\.(\w+))", name)
    if m:
        stage, block, conv, leaf, norm_leaf = m.groups()
        base = f"{DETECTRON2_STAGES[stage]}.{block}"
        if conv == "shortcut":
            return f"{base}.downsample.0.weight" if leaf == "weight" else f"{base}.downsample.1.{norm_leaf}"
        return f"{base}.{conv}.weight" if leaf == "weight" else f"{base}.bn{conv[-1]}.{norm_leaf}"
    m = re.fullmatch(r"linear\.(weight|bias)", name)
    if m:
        return f"fc.{m.group(1)}"
    return None


def resnet_arch(names: list[str]) -> str | None:
    """'resnet50' etc. from torchvision-named keys, or None when the blocks fit no torchvision ResNet."""
    blocks = []
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        indices = {int(k.split(".")[1]) for k in names if k.startswith(layer + ".") and k.split(".")[1].isdigit()}
        if not indices:
            return None
        blocks.append(max(indices) + 1)
    bottleneck = any(".conv3." in k for k in names)
    return RESNET_LAYOUTS.get((tuple(blocks), bottleneck))


def _format_name(scheme: str, prefix: str, wrapper: str, meta: dict, names: list[str], path: Path) -> str:
    if scheme == "detectron2":
        if path.suffix == ".pkl":
            return "detectron2 model-zoo pickle"
        return "detectron2 checkpoint"
    if prefix in ("module.encoder_q.", "encoder_q."):
        return "MoCo v2 checkpoint"
    if prefix in ("module.base_encoder.", "base_encoder."):
        return "MoCo v3 checkpoint"
    if "online" in prefix:
        return f"BYOL-style checkpoint (prefix '{prefix}')"
    if prefix:
        return f"ResNet state_dict with prefix '{prefix}'"
    # timm's train.py writes {"state_dict", "state_dict_ema"?, "args", "version", ...}; its ResNet-D models have a
    # deep stem (conv1.0, conv1.1, ...).
    timm_file = wrapper in ("state_dict", "state_dict_ema") and bool({"args", "version"} & set(meta))
    if timm_file or any(k.startswith("conv1.0.") for k in names):
        return "timm ResNet checkpoint"
    return "torchvision ResNet state_dict" + (f" (under '{wrapper}')" if wrapper else "")


def _to_tensor(value: torch.Tensor | np.ndarray) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))


def map_weights(path: str | Path, allow_pickle: bool = False) -> MappedWeights:
    """Read `path`, detect its format, choose the online encoder's tensors and rename them to torchvision's."""
    path = Path(path)
    arrays, wrapper, meta = _unwrap(_read_file(path, allow_pickle), path)
    keys = list(arrays)
    candidates = []  # (number of keys, scheme, prefix, keys)
    for scheme, root in (("torchvision", _torchvision_root), ("detectron2", _detectron2_root)):
        for prefix, members in _group_by_prefix(keys, root).items():
            if not any(marker in prefix for marker in TARGET_MARKERS):
                candidates.append((len(members), scheme, prefix, members))
    if not candidates:
        if any(re.match(r"res\d_\d+_branch", k) for k in keys):
            raise UserError(
                f"{path}: looks like a Caffe2/Detectron (v1) pickle (names like {keys[0]}); expected detectron2 "
                f"or torchvision names: convert it with detectron2's tools first"
            )
        raise UserError(
            f"{path}: no ResNet tensor names found (e.g. {keys[:3]}); expected torchvision names such "
            f"as layer1.0.conv1.weight or detectron2 names such as res2.0.conv1.weight"
        )
    # The largest group wins; on a tie the torchvision scheme (listed first) and the shorter prefix win.
    _, scheme, prefix, _ = max(candidates, key=lambda c: (c[0], c[1] == "torchvision", -len(c[2])))
    # Keys under the chosen prefix that fit no ResNet name are kept so the report lists them as unexpected;
    # keys outside it (a momentum copy, heads, a queue) belong to something else and are ignored.
    members = [k for k in keys if k.startswith(prefix)]
    state: StateDict = {}
    unmapped = []
    for key in members:
        name = key[len(prefix) :]
        if scheme == "detectron2":
            mapped = _detectron2_to_torchvision(name)
            if mapped is None:
                unmapped.append(name)
                mapped = name  # kept under its own name so the report lists it as unexpected
            name = mapped
        state[name] = _to_tensor(arrays[key])
    dropped = sorted(k for k in state if k.startswith("fc."))
    for k in dropped:
        del state[k]
    weights = MappedWeights(
        state=state,
        format_name=_format_name(scheme, prefix, wrapper, meta, list(state), path),
        wrapper=wrapper,
        prefix=prefix,
        dropped=dropped,
    )
    if scheme == "detectron2" and any(".conv3." in k for k in state) and meta.get("__author__") != "torchvision":
        weights.warnings.append(
            "detectron2 bottleneck weights: MSRA-style models put the stride in conv1 (1x1) where torchvision puts "
            "it in conv2 (3x3); loaded as they are (not transposed), so features differ from the source model "
            "until fine-tuning adapts them"
        )
    if unmapped:
        weights.warnings.append(f"{len(unmapped)} detectron2 names have no torchvision twin, e.g. {unmapped[0]}")
    return weights


def load_backbone_weights(path: str | Path, allow_pickle: bool = False) -> tuple[StateDict, str]:
    """(torchvision-named ResNet state dict without fc.*, the format's name) from a weights file.

    Raises UserError for a missing, unreadable or unrecognised file."""
    weights = map_weights(path, allow_pickle)
    return weights.state, weights.format_name


# --- loading into a backbone ----------------------------------------------------------------------------------
def _counted(name: str) -> bool:
    # num_batches_tracked is bookkeeping and fc is the classifier: neither is part of the backbone's weights.
    return not name.endswith("num_batches_tracked") and not name.startswith("fc.")


def load_into_backbone(
    backbone_body: nn.Module, path: str | Path, min_match_fraction: float = 0.5, allow_pickle: bool = False
) -> ImportReport:
    """Copy the file's tensors whose names and shapes fit into `backbone_body` (a module with torchvision ResNet
    names: conv1, bn1, layer1..layer4) and return the report, which is also logged.

    Refuses (UserError, nothing loaded) when the file's ResNet depth differs from the backbone's, or when the
    matching tensors hold less than `min_match_fraction` of the backbone's weight elements (tensor counts alone
    mislead: a resnet50's BatchNorm vectors fit most of a resnet18's)."""
    weights = map_weights(path, allow_pickle)
    target = {k: v for k, v in backbone_body.state_dict().items() if _counted(k)}
    source = {k: v for k, v in weights.state.items() if _counted(k)}
    report = ImportReport(
        path=str(path),
        format_name=weights.format_name,
        total=len(target),
        dropped=weights.dropped,
        warnings=list(weights.warnings),
    )
    usable = {}
    for name, value in source.items():
        if name not in target:
            report.unexpected.append(name)
        elif tuple(value.shape) != tuple(target[name].shape):
            report.shape_mismatches.append((name, tuple(value.shape), tuple(target[name].shape)))
        else:
            usable[name] = value
    report.loaded = sorted(usable)
    report.missing = [k for k in target if k not in usable and k not in source]

    file_arch, body_arch = resnet_arch(list(source)), resnet_arch(list(target))
    if file_arch and body_arch and file_arch != body_arch:
        raise UserError(
            f"{path}: looks like a {weights.format_name} of a {file_arch}, but the backbone is a {body_arch}; "
            f"expected matching depth (set model.detector.backbone.depth={file_arch.removeprefix('resnet')})"
        )
    total_numel = sum(v.numel() for v in target.values())
    loaded_numel = sum(target[k].numel() for k in usable)
    if total_numel == 0 or loaded_numel < min_match_fraction * total_numel:
        arch_hint = f"; the file holds a {file_arch}" if file_arch else ""
        raise UserError(
            f"{path}: looks like a {weights.format_name} but only {len(usable)} of {len(target)} backbone tensors "
            f"match ({loaded_numel / max(1, total_numel):.0%} of the weights, need {min_match_fraction:.0%})"
            f"{arch_hint}; expected a ResNet with the backbone's depth ({body_arch or 'unknown'})"
        )
    backbone_body.load_state_dict(usable, strict=False)
    log.info(report.summary())
    return report
