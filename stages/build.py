"""Models from config: `hydra.utils.instantiate` on `model.detector`, plus the chosen auxiliary heads."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from stages.common import instantiate_or_user_error
from stages.errors import UserError


def selected_aux_heads(model_cfg: DictConfig, num_aux_heads: int | None = None) -> list[tuple[str, DictConfig]]:
    """(name, config) of the first K heads named in `model.aux_heads`, their configs from `model.aux_head_configs`
    (K in range, every name known)."""
    k = model_cfg.get("num_aux_heads", 0) if num_aux_heads is None else num_aux_heads
    names = list(model_cfg.get("aux_heads", []) or [])
    if not isinstance(k, int) or not 0 <= k <= len(names):
        raise UserError(
            f"model.num_aux_heads: got {k!r}; expected an integer in 0..{len(names)} (heads available: {names})"
        )
    configs = model_cfg.get("aux_head_configs") or {}
    unknown = [name for name in names if name not in configs]
    if unknown:
        raise UserError(f"model.aux_heads: unknown head {unknown[0]!r}; expected one of {sorted(configs)}")
    return [(name, configs[name]) for name in names[:k]]


def validate_model_config(model_cfg: DictConfig) -> None:
    """Start-up checks that need no data: K in range, known head names, non-negative loss weights."""
    selected_aux_heads(model_cfg)
    for key in ("lambda1", "lambda2"):
        value = model_cfg.detector.get(key)
        if value is not None and value < 0:
            raise UserError(f"model.detector.{key}: got {value}; expected >= 0")


def detector_config_key(argument: str) -> str:
    """The config key behind a detector constructor argument named in a ModelConfigError. The auxiliary heads'
    only detector-level check is their strides, which come from model.aux_strides."""
    return "model.aux_strides" if argument == "aux_heads" else f"model.detector.{argument}"


def build_model(model_cfg: DictConfig, num_classes: int, num_aux_heads: int | None = None) -> nn.Module:
    """Instantiate the detector for `num_classes` classes. `num_aux_heads=0` builds the plain DETR (eval)."""
    validate_model_config(model_cfg)
    if not model_cfg.get("aux_heads"):
        return instantiate_or_user_error(model_cfg.detector, config_key=detector_config_key, num_classes=num_classes)
    heads = selected_aux_heads(model_cfg, num_aux_heads)
    # Factories, built by the detector after the DETR itself, so the DETR's initial weights for a given seed
    # do not depend on how many heads there are (a fair K ablation).
    aux_heads = [
        instantiate(
            config,
            _partial_=True,
            name=name,
            num_classes=num_classes,
            in_channels=model_cfg.d_model,
            strides=list(model_cfg.aux_strides),
        )
        for name, config in heads
    ]
    names = [f"aux{i}_{name}" for i, (name, _) in enumerate(heads)]
    return instantiate_or_user_error(
        model_cfg.detector,
        config_key=detector_config_key,
        num_classes=num_classes,
        aux_heads=aux_heads,
        aux_head_names=names,
    )
