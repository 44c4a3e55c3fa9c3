"""Models from config: `hydra.utils.instantiate` on `model.detector`, plus the chosen auxiliary heads."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from stages.common import instantiate_or_user_error
from stages.errors import UserError


def selected_aux_heads(model_cfg: DictConfig, num_aux_heads: int | None = None) -> list[DictConfig]:
    """The first K named head configs of `model.aux_heads`, validated (K in range, names unique)."""
    k = model_cfg.get("num_aux_heads", 0) if num_aux_heads is None else num_aux_heads
    heads = list(model_cfg.get("aux_heads", []) or [])
    if not isinstance(k, int) or not 0 <= k <= len(heads):
        raise UserError(
            f"model.num_aux_heads: got {k!r}; expected an integer in 0..{len(heads)} "
            f"(heads available: {[h.get('name') for h in heads]})"
        )
    return heads[:k]


def validate_model_config(model_cfg: DictConfig) -> None:
    """Start-up checks that need no data: K in range, known head names, non-negative loss weights."""
    selected_aux_heads(model_cfg)
    known = set(model_cfg.get("known_aux_heads", []) or [])
    for head in model_cfg.get("aux_heads", []) or []:
        if known and head.get("name") not in known:
            raise UserError(f"model.aux_heads: unknown head {head.get('name')!r}; expected one of {sorted(known)}")
    for key in ("lambda1", "lambda2"):
        value = model_cfg.detector.get(key)
        if value is not None and value < 0:
            raise UserError(f"model.detector.{key}: got {value}; expected >= 0")


def build_model(model_cfg: DictConfig, num_classes: int, num_aux_heads: int | None = None) -> nn.Module:
    """Instantiate the detector for `num_classes` classes. `num_aux_heads=0` builds the plain DETR (eval)."""
    validate_model_config(model_cfg)
    if not model_cfg.get("aux_heads"):
        return instantiate_or_user_error(model_cfg.detector, num_classes=num_classes)
    heads = selected_aux_heads(model_cfg, num_aux_heads)
    # Factories, built by the detector after the DETR itself, so the DETR's initial weights for a given seed
    # do not depend on how many heads there are (a fair K ablation).
    aux_heads = [
        instantiate(
            head,
            _partial_=True,
            num_classes=num_classes,
            in_channels=model_cfg.d_model,
            strides=list(model_cfg.aux_strides),
        )
        for head in heads
    ]
    names = [f"aux{i}_{head.name}" for i, head in enumerate(heads)]
    return instantiate_or_user_error(
        model_cfg.detector, num_classes=num_classes, aux_heads=aux_heads, aux_head_names=names
    )
