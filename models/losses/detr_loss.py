"""DETR set losses: sigmoid focal classification, L1 and GIoU on matched boxes, per decoder layer."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

from models.matching.hungarian import HungarianMatcher


def num_target_boxes(targets: list[dict[str, Tensor]], device: torch.device) -> float:
    """Target boxes per rank, averaged over ranks when torch.distributed is initialised, at least 1."""
    count = float(sum(len(t["labels"]) for t in targets))
    if dist.is_available() and dist.is_initialized():
        # Only here through the device: a round trip waits for it (a sync per loss on a GPU).
        total = torch.as_tensor([count], device=device)
        dist.all_reduce(total)
        count = float(total.item()) / dist.get_world_size()
    return max(count, 1.0)


class SetCriterion(nn.Module):
    """Weighted DETR losses for every decoder layer (and optionally the two-stage encoder proposals).

    Args:
        matcher: assigns predictions to targets (HungarianMatcher).
        loss_cls, loss_bbox, loss_giou: weights of the focal, L1 and GIoU losses.
        focal_alpha, focal_gamma: sigmoid focal loss parameters.

    Predictions and targets use normalised cxcywh boxes; targets are dicts with "labels" int64 [N] and
    "boxes" [N, 4]. Each loss is summed over its elements and divided by the number of target boxes
    (`num_target_boxes`, averaged over ranks). Losses are computed in float32. Returned losses are
    already weighted: their sum is the objective. Any non-finite loss raises FloatingPointError naming it.
    """

    def __init__(
        self,
        matcher: HungarianMatcher,
        loss_cls: float,
        loss_bbox: float,
        loss_giou: float,
        focal_alpha: float,
        focal_gamma: float,
    ) -> None:
        super().__init__()
        self.matcher = matcher
        self.weights = {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "loss_giou": loss_giou}
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def loss_for_assignment(
        self,
        logits: Tensor,
        boxes: Tensor,
        targets: list[dict[str, Tensor]],
        indices: list[tuple[Tensor, Tensor]],
        num_boxes: float,
        valid: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Losses of one prediction set under GIVEN assignments (no matching).

        logits [B, Q, K], boxes [B, Q, 4]; indices[i] = (pred_idx, tgt_idx) pairs prediction pred_idx[j] of
        image i with target tgt_idx[j]; every other prediction has all-zero class targets (background).
        valid Bool[B, Q] (optional): predictions outside it take no loss. Returns the weighted
        {"loss_cls", "loss_bbox", "loss_giou"}.
        """
        losses = self.layer_losses(logits[None], boxes[None], targets, [indices], num_boxes, valid)
        return {name: value[0] for name, value in losses.items()}

    def layer_losses(
        self,
        logits: Tensor,
        boxes: Tensor,
        targets: list[dict[str, Tensor]],
        indices: list[list[tuple[Tensor, Tensor]]],
        num_boxes: float,
        valid: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """`loss_for_assignment` of L prediction sets at once (a decoder's layers): logits [L, B, Q, K], boxes
        [L, B, Q, 4], indices[l] layer l's assignment (int64 host tensors, as the matcher gives them), valid
        Bool[B, Q] for every layer. Returns {"loss_cls", "loss_bbox", "loss_giou"}, each a Tensor [L].

        One pass over all layers instead of one per layer: on a GPU every small operation is a kernel launch,
        and the launches of per-layer losses outlasted their arithmetic."""
        num_layers = logits.shape[0]
        logits = logits.float()
        boxes = boxes.float()
        offsets = [0]
        for target in targets:
            offsets.append(offsets[-1] + len(target["labels"]))
        # (layer, image, prediction, target in the concatenated targets) of every pair: one copy to the device.
        pairs = []
        for layer, layer_indices in enumerate(indices):
            for image, (pred, tgt) in enumerate(layer_indices):
                pred, tgt = pred.cpu(), tgt.cpu()
                pairs.append(
                    torch.stack(
                        [torch.full_like(pred, layer), torch.full_like(pred, image), pred, tgt + offsets[image]]
                    )
                )
        layer_idx, batch_idx, pred_idx, tgt_idx = torch.cat(pairs, 1).to(logits.device)
        tgt_labels = torch.cat([t["labels"] for t in targets]).to(logits.device)[tgt_idx]
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(boxes)[tgt_idx]

        onehot = torch.zeros_like(logits)
        onehot[layer_idx, batch_idx, pred_idx, tgt_labels] = 1.0
        focal = sigmoid_focal_loss(logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="none")
        if valid is not None:
            focal = focal * valid[None, ..., None].to(focal.dtype)
        matched = boxes[layer_idx, batch_idx, pred_idx]
        giou = generalized_box_iou_loss(
            box_convert(matched, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy"), reduction="none"
        )
        l1 = F.l1_loss(matched, tgt_boxes, reduction="none").sum(-1)
        per_layer = torch.zeros(2, num_layers, device=boxes.device).index_add_(1, layer_idx, torch.stack([l1, giou]))
        return {
            "loss_cls": self.weights["loss_cls"] * focal.flatten(1).sum(1) / num_boxes,
            "loss_bbox": self.weights["loss_bbox"] * per_layer[0] / num_boxes,
            "loss_giou": self.weights["loss_giou"] * per_layer[1] / num_boxes,
        }

    def objectness_loss(self, logits: Tensor, indices: list[tuple[Tensor, Tensor]], num_boxes: float) -> Tensor:
        """The weighted focal loss with every class logit of a matched prediction as positive and every logit of
        the others as negative (AlignDet's objectness option); logits [B, Q, K]. Normalised per class as well, so
        it is the loss of one class head whatever the number of classes."""
        logits = logits.float()
        targets = torch.zeros_like(logits)
        for image, (pred, _) in enumerate(indices):
            targets[image, pred.to(logits.device)] = 1.0
        focal = sigmoid_focal_loss(logits, targets, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum")
        return self.weights["loss_cls"] * focal / (num_boxes * logits.shape[-1])

    def match_and_loss(
        self,
        logits: Tensor,
        boxes: Tensor,
        targets: list[dict[str, Tensor]],
        num_boxes: float,
        valid: Tensor | None = None,
    ) -> tuple[dict[str, Tensor], list[tuple[Tensor, Tensor]]]:
        """Hungarian-match one prediction set, then `loss_for_assignment`. Returns (losses, indices)."""
        indices = self.matcher(logits, boxes, targets, valid)
        return self.loss_for_assignment(logits, boxes, targets, indices, num_boxes, valid), indices

    def forward(
        self,
        logits: Tensor,
        boxes: Tensor,
        targets: list[dict[str, Tensor]],
        enc_logits: Tensor | None = None,
        enc_boxes: Tensor | None = None,
        enc_valid: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Losses of all decoder layers: logits [L, B, Q, K], boxes [L, B, Q, 4].

        Keys: "loss_cls", "loss_bbox", "loss_giou" for the last layer, the same with "_d0".."_d{L-2}" for the
        earlier layers, and with "_enc" for the encoder proposals (enc_logits [B, S, 1], enc_boxes [B, S, 4],
        enc_valid Bool[B, S]), which are matched to the targets with every label set to 0 (object or not).
        """
        num_boxes = num_target_boxes(targets, logits.device)
        indices = self.matcher.match_layers(logits, boxes, targets)
        losses = name_layers(self.layer_losses(logits, boxes, targets, indices, num_boxes))
        if enc_logits is not None:
            if enc_boxes is None:
                raise ValueError("SetCriterion: enc_logits given without enc_boxes")
            binary = [{"labels": torch.zeros_like(t["labels"]), "boxes": t["boxes"]} for t in targets]
            enc_losses, _ = self.match_and_loss(enc_logits, enc_boxes, binary, num_boxes, enc_valid)
            losses.update({f"{name}_enc": value for name, value in enc_losses.items()})
        check_finite(losses, "SetCriterion")
        return losses


def name_layers(losses: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-layer losses ({name: Tensor [L]}) as SetCriterion's keys: "{name}" for the last layer, "{name}_d{l}"
    for layer l of the others."""
    num_layers = len(next(iter(losses.values())))
    named = {}
    for layer in range(num_layers):
        suffix = "" if layer == num_layers - 1 else f"_d{layer}"
        named.update({f"{name}{suffix}": values[layer] for name, values in losses.items()})
    return named


def check_finite(losses: dict[str, Tensor], owner: str) -> None:
    """Raise FloatingPointError naming every non-finite loss (one device sync for the whole dict)."""
    if not losses:
        return
    if bool(torch.isfinite(torch.stack([v.detach().float() for v in losses.values()])).all()):
        return
    bad = {name: float(v.detach()) for name, v in losses.items() if not torch.isfinite(v.detach()).all()}
    raise FloatingPointError(f"{owner}: non-finite loss {bad}; check the learning rate, inputs and target boxes")
