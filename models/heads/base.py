"""The contract of a Co-DETR auxiliary head: weighted losses plus the positives its assigner chose.

An auxiliary head trains one-to-many on the multi-scale adapter's maps (Co-DETR §3.2) and hands its positive
anchors / proposals / points, with the targets its own assigner gave them, to the Co-DETR meta-architecture,
which turns them into customised positive queries (§3.3). Heads run in training only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn


@dataclass
class AuxPositives:
    """One head's positives and a sample of its negatives; every field is a list with one tensor per image.

    - `boxes` [P, 4] float xyxy input-image pixels: the head's own reference box of each positive (the anchor,
      the sampled proposal, or the FCOS point's square box); detached, not clipped to the image.
    - `labels` [P] int64 in 0..C-1: the class the head's assigner gave it.
    - `target_boxes` [P, 4] float xyxy pixels: the ground-truth box it was assigned.
    - `gt_indices` [P] int64: the index of that box in `targets[i]["boxes"]`.
    - `features` [P, C]: one feature per positive (the input map at the prior's location for dense heads, the
      mean-pooled RoIAlign feature for Faster R-CNN); NOT detached, so query losses reach the encoder.
    - `negative_boxes` [N, 4] / `negative_features` [N, C]: a uniform random sample, N <= the head's
      `max_negatives`, of the head's negatives (background priors or sampled background proposals); Co-DETR pads
      query groups with them.
    """

    boxes: list[Tensor]
    labels: list[Tensor]
    target_boxes: list[Tensor]
    gt_indices: list[Tensor]
    features: list[Tensor]
    negative_boxes: list[Tensor]
    negative_features: list[Tensor]

    def num_positives(self) -> list[int]:
        return [int(b.shape[0]) for b in self.boxes]


class AuxHead(nn.Module):
    """Base of the auxiliary heads.

    Constructor: `name` (a short tag, e.g. "atss", used by the meta-architecture for loss-key prefixes),
    `num_classes` (C, labels contiguous 0..C-1), `in_channels` (the adapter's width, d_model), `strides` (one per
    input level, finest first), `max_negatives` (per image, for `AuxPositives`) and `align_drop_keys` (what a
    box-pretrained checkpoint of the head leaves out of fine-tuning: `align_drop_keys()`).

    forward(features, strides, image_sizes, targets) -> (losses, positives), training only:
    - `features`: list of [B, C, H_l, W_l] maps of the padded batch, finest first, level l at `strides[l]`;
    - `image_sizes`: (h, w) of each image before padding; prior locations beyond them are ignored;
    - `targets`: one dict per image with `boxes` [G, 4] float xyxy pixels and `labels` [G] int64 (G may be 0);
    - `losses`: already weighted scalars whose sum is the head's objective; keys carry no prefix;
    - assignment and loss maths run in float32 with autocast off; nothing assumes a device.
    """

    # Its classification loss in `losses`: box-domain pre-training (AlignDet) replaces the classifier by a
    # projector, so it leaves that loss out.
    classification_loss_key = "loss_cls"

    def __init__(
        self,
        name: str,
        num_classes: int,
        in_channels: int,
        strides: list[int],
        max_negatives: int,
        align_drop_keys: Sequence[str],
    ):
        super().__init__()
        self.name = name
        self.transfer_drop_keys = list(align_drop_keys)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.strides = [int(s) for s in strides]
        self.max_negatives = max_negatives

    def check_inputs(self, features: list[Tensor], strides: list[int]) -> None:
        """Raise ValueError when the maps or strides disagree with the strides the head was built for."""
        if [int(s) for s in strides] != self.strides:
            raise ValueError(f"{type(self).__name__}: got strides {list(strides)}; built for {self.strides}")
        if len(features) != len(self.strides):
            raise ValueError(f"{type(self).__name__}: got {len(features)} maps; expected {len(self.strides)}")

    def align_drop_keys(self) -> list[str]:
        """State-dict key patterns (inside the head; `stages.engine.checkpoint.drop_matches`) that a box-pretrained
        checkpoint leaves out of fine-tuning: its classifier and last box-regression layer (the head config's
        `align_drop_keys`)."""
        return list(self.transfer_drop_keys)

    def forward(
        self,
        features: list[Tensor],
        strides: list[int],
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
    ) -> tuple[dict[str, Tensor], AuxPositives]:
        raise NotImplementedError(f"{type(self).__name__} must implement forward")
