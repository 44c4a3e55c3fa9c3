"""Hungarian (one-to-one) matching of predictions to targets for DETR-style set losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou


def focal_class_cost(logits: Tensor, labels: Tensor, alpha: float, gamma: float) -> Tensor:
    """Focal-loss cost [Q, N] of giving each prediction each target's label: the positive focal term of the
    target class minus its negative term (Deformable-DETR). logits [Q, K], labels int64 [N]."""
    prob = logits.sigmoid()
    # -log(p) = softplus(-x) and -log(1 - p) = softplus(x): stable for large |x|.
    pos = alpha * (1 - prob) ** gamma * F.softplus(-logits)
    neg = (1 - alpha) * prob**gamma * F.softplus(logits)
    return pos[:, labels] - neg[:, labels]


class HungarianMatcher(nn.Module):
    """Optimal one-to-one assignment per image under cost_class * focal + cost_bbox * L1 + cost_giou * (-GIoU).

    forward(logits [B, Q, K] or None, boxes [B, Q, 4], targets, valid=None) -> list over images of
    (pred_idx, tgt_idx) int64 CPU tensors, both of length min(Q_valid, N_i), pred_idx ascending.

    - boxes and targets' "boxes" are normalised cxcywh; targets' "labels" are int64 in 0..K-1.
    - cost_class = 0 gives a box-only cost (AlignDet's proposal assignment); logits may then be None.
    - valid Bool[B, Q] (optional) restricts the candidates to the True predictions.
    - Costs are computed in float32 with autocast off. A NaN or inf in a cost raises FloatingPointError
      naming the matcher and the cost term.
    """

    def __init__(self, cost_class: float, cost_bbox: float, cost_giou: float, focal_alpha: float, focal_gamma: float):
        super().__init__()
        if min(cost_class, cost_bbox, cost_giou) < 0 or cost_class == cost_bbox == cost_giou == 0:
            raise ValueError(
                f"HungarianMatcher: costs ({cost_class}, {cost_bbox}, {cost_giou}); expected >= 0 and not all 0"
            )
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def box_only(self) -> HungarianMatcher:
        """This matcher without its class cost: L1 + GIoU only (AlignDet's proposals have no class)."""
        return HungarianMatcher(0.0, self.cost_bbox, self.cost_giou, self.focal_alpha, self.focal_gamma)

    def cost_terms(self, logits: Tensor | None, boxes: Tensor, labels: Tensor, tgt_boxes: Tensor) -> dict[str, Tensor]:
        """The weighted cost terms [Q, N] for one image (float32); only terms with a non-zero weight."""
        terms = {}
        if self.cost_class > 0:
            if logits is None:
                raise ValueError("HungarianMatcher: cost_class > 0 needs logits; got None")
            terms["cost_class"] = self.cost_class * focal_class_cost(
                logits.float(), labels, self.focal_alpha, self.focal_gamma
            )
        if self.cost_bbox > 0:
            terms["cost_bbox"] = self.cost_bbox * torch.cdist(boxes.float(), tgt_boxes.float(), p=1)
        if self.cost_giou > 0:
            terms["cost_giou"] = -self.cost_giou * generalized_box_iou(
                box_convert(boxes.float(), "cxcywh", "xyxy"), box_convert(tgt_boxes.float(), "cxcywh", "xyxy")
            )
        return terms

    @torch.no_grad()
    def forward(
        self, logits: Tensor | None, boxes: Tensor, targets: list[dict[str, Tensor]], valid: Tensor | None = None
    ) -> list[tuple[Tensor, Tensor]]:
        """The assignment of one prediction set (class docstring)."""
        return self.match_layers(None if logits is None else logits[None], boxes[None], targets, valid)[0]

    @torch.no_grad()
    def match_layers(
        self, logits: Tensor | None, boxes: Tensor, targets: list[dict[str, Tensor]], valid: Tensor | None = None
    ) -> list[list[tuple[Tensor, Tensor]]]:
        """`forward` for L prediction sets against the same targets (a decoder's layers): logits [L, B, Q, K] or
        None, boxes [L, B, Q, 4], valid Bool[B, Q] for all of them -> per layer, per image (pred_idx, tgt_idx).

        The same assignments as L calls of `forward`, with the costs of each image computed for all layers at once
        and copied to the host in one transfer: on a GPU each copy waits for the device, and each small operation
        costs a launch, so per-layer and per-image costs left the device idle for most of a DETR step."""
        num_layers, _, num_queries = boxes.shape[:3]
        sizes = [len(t["labels"]) for t in targets]
        costs, terms_per_image = [], []
        with torch.autocast(device_type=boxes.device.type, enabled=False):
            for i, target in enumerate(targets):
                if sizes[i] == 0:
                    terms_per_image.append({})
                    continue
                image_logits = None if logits is None else logits[:, i].reshape(num_layers * num_queries, -1)
                image_boxes = boxes[:, i].reshape(num_layers * num_queries, 4)
                terms = self.cost_terms(image_logits, image_boxes, target["labels"], target["boxes"])
                terms_per_image.append(terms)
                costs.append(sum(terms.values()).flatten())
        host = torch.cat(costs).cpu().split([num_layers * num_queries * n for n in sizes if n]) if costs else []
        host_valid = valid.cpu() if valid is not None else None
        empty = torch.zeros(0, dtype=torch.int64)
        indices: list[list[tuple[Tensor, Tensor]]] = [[] for _ in range(num_layers)]
        blocks = iter(host)
        for i, terms in enumerate(terms_per_image):
            cost = next(blocks).view(num_layers, num_queries, sizes[i]) if terms else None
            candidates = torch.arange(num_queries) if host_valid is None else host_valid[i].nonzero().flatten()
            if cost is None or len(candidates) == 0:
                for layer in indices:
                    layer.append((empty, empty.clone()))
                continue
            if host_valid is not None:
                cost = cost[:, candidates]
            if not torch.isfinite(cost).all():
                kept = candidates.to(boxes.device)
                bad = [
                    name
                    for name, term in terms.items()
                    if not torch.isfinite(term.view(num_layers, num_queries, -1)[:, kept]).all()
                ]
                raise FloatingPointError(
                    f"HungarianMatcher: non-finite {', '.join(bad) or 'total cost'} for image {i} of the batch "
                    "(NaN/inf predictions or target boxes)"
                )
            for layer in range(num_layers):
                rows, cols = linear_sum_assignment(cost[layer].numpy())
                pred = candidates[torch.as_tensor(rows, dtype=torch.int64)]
                indices[layer].append((pred, torch.as_tensor(cols, dtype=torch.int64)))
        return indices
