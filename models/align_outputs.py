"""What a detector hands the AlignDet wrapper for one view: per-branch features with the proposal id each was
assigned to by the detector's own assigner, and the detector's box regression losses against the proposals."""

from __future__ import annotations

from dataclasses import dataclass, field

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
