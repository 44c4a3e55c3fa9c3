"""The protocol between AlignDet (models/pretrain/aligndet.py) and the detector it pre-trains.

Every detector in models/meta_arch/ implements `AlignableDetector` as methods: for one view it hands back
per-branch features with the proposal id each was assigned by the detector's own assigner, and its box regression
losses against the proposals; the wrapper builds one projection MLP per branch from `align_feature_dims()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from torch import Tensor


@dataclass
class AlignOutputs:
    """One view's box-domain outputs.

    features: branch name (e.g. "detr", "aux0_atss", "fcos", "rcnn") -> [N_b, C_b] features of the predictions
        (queries, anchors, points or RoIs) that the branch's assigner matched to a proposal; positives only.
    ids: branch name -> [N_b] int64 proposal id of each feature row (ids are unique across the batch and equal
        for the same region in both views). Rows of `features[b]` and `ids[b]` correspond one to one.
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
    """Choices the AlignDet stage makes about how a detector matches and trains on proposals. Only the DETR
    family has any to make; the other detectors take them and ignore them.

    all_layers: label the matched queries of every decoder layer (the reference) or only the last.
    objectness: also train the decoder class heads to score proposals as objects, and keep them for
        fine-tuning (see DeformableDETR).
    pseudo_classes: the targets' `labels` are pseudo-classes (cluster ids of the proposals, < the detector's
        num_classes): match with the full class + box cost and train the class heads on them (see DeformableDETR).
        Only the DETR family supports it; the other detectors raise. Excludes `objectness`.
    """

    all_layers: bool = True
    objectness: bool = False
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


# The options a detector uses when called without any: the reference's (every decoder layer labelled, no objectness).
DEFAULT_ALIGN_OPTIONS = AlignOptions()


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
