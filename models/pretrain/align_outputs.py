"""The protocol between AlignDet (models/pretrain/aligndet.py) and the detector it pre-trains.

Every detector in models/meta_arch/ implements `AlignableDetector` as methods: for one view it hands back
per-branch features with the proposal id each was assigned by the detector's own assigner, and its box regression
losses against the proposals; the wrapper builds one projection MLP per branch from `align_feature_dims()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

# The id of a background sample (an unmatched query, a background prior): a negative of every proposal, never a
# query or a positive.
BACKGROUND_ID = -1


@dataclass
class AlignOutputs:
    """One view's box-domain outputs.

    features: branch name (e.g. "detr", "aux0_atss", "fcos", "rcnn") -> [N_b, C_b] features of the predictions
        (queries, anchors, points or RoIs) that the branch's assigner matched to a proposal, then, where the
        branch has them and `AlignOptions.max_background` allows, background samples (`with_background`).
    ids: branch name -> [N_b] int64 proposal id of each feature row (ids are unique across the batch and equal
        for the same region in both views; `BACKGROUND_ID` for a background sample). Rows of `features[b]` and
        `ids[b]` correspond one to one.
    losses: weighted box regression losses against the proposals, prefixed keys (`detr/loss_bbox`, ...);
        empty when the caller asked for no losses (the momentum view).
    """

    features: dict[str, Tensor] = field(default_factory=dict)
    ids: dict[str, Tensor] = field(default_factory=dict)
    losses: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if set(self.features) != set(self.ids):
            raise ValueError(
                f"AlignOutputs: feature branches {sorted(self.features)} != id branches {sorted(self.ids)}"
            )
        for name, feats in self.features.items():
            ids = self.ids[name]
            if feats.dim() != 2 or ids.dim() != 1 or feats.shape[0] != ids.shape[0]:
                raise ValueError(
                    f"AlignOutputs[{name!r}]: features {tuple(feats.shape)} and ids {tuple(ids.shape)}; "
                    "expected [N, C] and [N]"
                )


@dataclass(frozen=True)
class AlignOptions:
    """Choices the AlignDet stage makes about how a detector matches and trains on proposals. `all_layers`,
    `objectness` and `pseudo_classes` concern the DETR family's decoder (the other detectors ignore the first two
    and refuse the third); `max_background` every branch that has background samples.

    all_layers: label the matched queries of every decoder layer (the reference) or only the last.
    objectness: also train the decoder class heads to score proposals as objects, and keep them for
        fine-tuning (see DeformableDETR).
    max_background: background samples per view added to a branch's rows as negatives of every proposal, drawn
        at random when there are more: the unmatched queries of the labelled decoder layers (DETR), background
        points (FCOS) and anchor locations (RetinaNet), as the reference; 0 = the other proposals alone.
    pseudo_classes: the targets' `labels` are pseudo-classes (cluster ids of the proposals, < the detector's
        num_classes): match with the full class + box cost and train the class heads on them (see DeformableDETR).
        Only the DETR family supports it; the other detectors raise. Excludes `objectness`.
    """

    all_layers: bool = True
    objectness: bool = False
    max_background: int = 0
    pseudo_classes: bool = False

    def __post_init__(self) -> None:
        if self.objectness and self.pseudo_classes:
            raise ValueError(
                "AlignOptions: objectness and pseudo_classes both set; they train the class heads differently"
            )


def reject_pseudo_classes(options: AlignOptions, detector: object) -> None:
    """Raise ValueError when `options.pseudo_classes` reaches a detector outside the DETR family: AlignDet's
    pseudo-class labels are a DETR setting only, and ignoring them would pass off a plain run as one with them."""
    if options.pseudo_classes:
        raise ValueError(
            f"{type(detector).__name__}: pseudo-classes train a DETR-family class head; this detector has none"
        )


# The options a detector uses when called without any: every decoder layer labelled as the reference, no
# objectness, no background samples (the box_pretrain stage sets the reference's).
DEFAULT_ALIGN_OPTIONS = AlignOptions()


def with_background(features: Tensor, ids: Tensor, background: Tensor, max_background: int) -> tuple[Tensor, Tensor]:
    """A branch's positive rows followed by at most `max_background` of the `background` rows ([M, C], drawn
    without replacement from the global torch RNG when M is larger), the latter with id `BACKGROUND_ID`."""
    if max_background < 0:
        raise ValueError(f"with_background: max_background {max_background}; expected >= 0")
    if background.shape[0] > max_background:
        pick = torch.randperm(background.shape[0])[:max_background].to(background.device)
        background = background[pick]
    background_ids = torch.full((background.shape[0],), BACKGROUND_ID, dtype=ids.dtype, device=ids.device)
    return torch.cat([features, background.to(features.dtype)]), torch.cat([ids, background_ids])


@runtime_checkable
class AlignableDetector(Protocol):
    """What the AlignDet wrapper calls on the detector it pre-trains."""

    def align_outputs(
        self, images: list[Tensor], targets: list[dict[str, Tensor]], with_losses: bool, options: AlignOptions
    ) -> AlignOutputs:
        """`images`: CHW float in [0, 1]; `targets[i]`: `boxes` [n_i, 4] xyxy pixels (the proposals), `labels`
        [n_i] int64 (all 0, one class, unless `options.pseudo_classes`), `ids` [n_i] int64. `with_losses=False`:
        no regression losses (the momentum view, under no_grad)."""
        ...

    def align_feature_dims(self) -> dict[str, int]:
        """Branch name -> width C_b of `AlignOutputs.features[branch]`, known before any forward pass."""
        ...

    def align_drop_keys(self, options: AlignOptions) -> list[str]:
        """Substrings of state-dict keys to leave out when a box-pretrained checkpoint seeds fine-tuning (the
        classifiers and last regression layers, as AlignDet's weight-extraction script drops them)."""
        ...
