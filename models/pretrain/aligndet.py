"""AlignDet box-domain pre-training (ICCV 2023): pre-train a whole detector on unlabelled images.

An online detector sees view 1 of each image, an EMA (momentum) copy sees view 2 without gradients. Each detector
branch's own assigner decides which predictions belong to which selective-search proposal (`AlignOutputs`), a
projection MLP per branch takes the place of that branch's classifier, and a box-domain InfoNCE pulls the online
embeddings of a proposal towards the momentum embeddings of the same proposal in the other view, away from every
other proposal of the batch and from background samples (unmatched queries, background points and anchors). The
detector's own box regression losses against the view-1 proposals are added.
Only the online detector goes on to fine-tuning.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.pretrain.align_outputs import BACKGROUND_ID, AlignableDetector, AlignOptions, AlignOutputs


def box_contrastive_loss(q_feats: Tensor, q_ids: Tensor, k_feats: Tensor, k_ids: Tensor, temperature: float) -> Tensor:
    """AlignDet's box-domain contrastive loss (its `ContrastiveLoss` with the per-id loop of the heads).

    For each id l >= 0 present in the online samples: queries Q = online embeddings with id l, keys K = momentum
    embeddings with id l (K = Q when the momentum view has none), negatives N = every online and momentum
    embedding with an id other than l, detached: the other proposals' and the background samples (id
    `BACKGROUND_ID`: unmatched queries, background priors), which are negatives only. All are L2-normalised.
    With s(a, b) = a.b / temperature, each pair (q, k) in Q x K costs -log(exp(s(q,k)) / (exp(s(q,k)) + sum_{n in N} exp(s(q,n)))); the loss of id l is
    the mean over its |Q||K| pairs, and the result the mean over the ids. Vectorised with masks, no loop over ids.

    q_feats [Nq, C], q_ids int64 [Nq] (online); k_feats [Nk, C], k_ids int64 [Nk] (momentum; Nk may be 0).
    Returns a scalar; 0 (still connected to q_feats' graph) when no online row has a proposal id.
    """
    if q_feats.shape[0] != q_ids.shape[0] or k_feats.shape[0] != k_ids.shape[0]:
        raise ValueError(
            f"box_contrastive_loss: {q_feats.shape[0]} online features for {q_ids.shape[0]} ids, "
            f"{k_feats.shape[0]} momentum features for {k_ids.shape[0]} ids"
        )
    if temperature <= 0:
        raise ValueError(f"box_contrastive_loss: temperature {temperature}; expected > 0")
    device = q_feats.device
    q_ids, k_ids = q_ids.to(device), k_ids.to(device)
    # Both views' samples, L2-normalised; background rows only ever serve as negatives.
    everyone = F.normalize(torch.cat([q_feats, k_feats.to(device)]).float(), dim=1)
    everyone_ids = torch.cat([q_ids, k_ids])
    is_query, is_key = q_ids != BACKGROUND_ID, k_ids != BACKGROUND_ID
    if not bool(is_query.any()):
        return q_feats.sum() * 0.0
    q, q_ids = everyone[: len(is_query)][is_query], q_ids[is_query]
    k, k_ids = everyone[len(is_query) :][is_key], k_ids[is_key]

    # Negatives: every sample of both views whose id differs from the query's, background included, detached.
    neg_logits = (q @ everyone.detach().T / temperature).masked_fill(
        q_ids[:, None] == everyone_ids[None, :], float("-inf")
    )
    neg_lse = torch.logsumexp(neg_logits, dim=1)  # [Nq]; -inf when a query has no negative

    # Positives: the momentum samples of the query's id, or (no such sample) the online ones, undetached.
    same_online = q_ids[:, None] == q_ids[None, :]  # [Nq, Nq]
    key_mask = q_ids[:, None] == k_ids[None, :]  # [Nq, Nk]
    has_key = key_mask.any(dim=1)  # [Nq]
    pos_mask = torch.cat([key_mask, same_online & ~has_key[:, None]], dim=1)  # [Nq, Nk + Nq]
    pos_logits = q @ torch.cat([k, q]).T / temperature

    # -log(e^a / (e^a + e^b)) = softplus(b - a); b = -inf (no negative) gives 0.
    pair_loss = F.softplus(neg_lse[:, None] - pos_logits)
    # Pair weight 1 / (|Q_l| |K_l| #ids): mean over the id's pairs, then over the ids.
    num_ids = torch.unique(q_ids).numel()
    pairs_per_id = same_online.sum(dim=1) * pos_mask.sum(dim=1)  # |Q_l| |K_l| for each query's id l
    weights = 1.0 / (pairs_per_id.to(pair_loss.dtype) * num_ids)
    return (pair_loss * pos_mask.to(pair_loss.dtype)).sum(dim=1).mul(weights).sum()


def momentum_at(progress: float, base_momentum: float) -> float:
    """m = 1 - (1 - base) (cos(pi progress) + 1) / 2: base at progress 0, rising to 1 at progress 1 (clamped)."""
    progress = min(max(float(progress), 0.0), 1.0)
    return 1.0 - (1.0 - base_momentum) * (math.cos(math.pi * progress) + 1.0) / 2.0


def projector(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """MoCo-v2-style 2-layer MLP (Linear -> ReLU -> Linear), AlignDet's replacement for a branch's classifier."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


def image_domain_backbone(detector: nn.Module) -> nn.Module:
    """The part of `detector` that image-domain pre-training produced: `detector.backbone.body` (the torchvision
    trunk, the `backbone.body.*` keys of an image_pretrain checkpoint), else `detector.backbone`."""
    backbone = getattr(detector, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise ValueError(f"AlignDet: {type(detector).__name__} has no `backbone` module to freeze")
    body = getattr(backbone, "body", None)
    return body if isinstance(body, nn.Module) else backbone


def batch_unique_ids(targets1: Sequence[dict], targets2: Sequence[dict]) -> tuple[list[Tensor], list[Tensor]]:
    """Per-image ids offset so they are unique across the batch and equal for the same region in both views.

    Image i's ids are shifted by the number of id slots of images 0..i-1, where an image's slots are
    1 + its largest id in either view (ids that only one view kept still get their own slot). Returns one
    int64 tensor per image and view, on the ids' device.
    """
    if len(targets1) != len(targets2):
        raise ValueError(f"batch_unique_ids: {len(targets1)} targets in view 1, {len(targets2)} in view 2")
    ids1, ids2 = [], []
    offset = 0
    for target1, target2 in zip(targets1, targets2, strict=True):
        a, b = target1["ids"], target2["ids"]
        ids1.append(a + offset)
        ids2.append(b + offset)
        largest = max([int(a.max()) if len(a) else -1, int(b.max()) if len(b) else -1])
        offset += largest + 1
    return ids1, ids2


class AlignDet(nn.Module):
    """The AlignDet wrapper around any detector that speaks the align protocol (`AlignableDetector`:
    `align_outputs`, `align_feature_dims`, `align_drop_keys`; every detector in models/meta_arch/ does).

    Targets handed to the detector carry `boxes` (xyxy pixels, the view's proposals), `labels` (zeros, or the
    proposals' pseudo-classes) and `ids` (made unique across the batch here, equal for the same region in both
    views).

    Args:
        detector: the online detector (its weights are what fine-tuning loads).
        projector_hidden_dim: hidden width of each branch's projector; None = the branch's feature width.
        projector_out_dim: embedding width (the reference's 256).
        temperature: InfoNCE temperature (0.5 in every released config).
        base_momentum: EMA momentum at the start; it rises to 1 on a cosine schedule (`update_momentum`).
        contrastive_weight: weight of each branch's contrastive loss.
        freeze_backbone: keep the image-domain backbone (`image_domain_backbone`) as it is: no gradients and
            BatchNorm in eval mode (the reference runs it under no_grad with norm_eval).
        max_background: background samples per view in each branch's negatives (`AlignOptions.max_background`).
        detr_all_layers, detr_objectness, detr_pseudo_classes: the DETR family's `AlignOptions` (`all_layers`,
            `objectness`, `pseudo_classes`).
        The options are handed to the detector with every call.

    forward(images1, targets1, images2, targets2) -> losses: the online detector's box losses on view 1 plus
    `align/loss_contrastive_<branch>` per branch. `update_momentum(progress)` after each optimiser step.
    The momentum copy (`momentum_detector`, `momentum_projectors`) has requires_grad False throughout.
    """

    def __init__(
        self,
        detector: nn.Module,
        projector_hidden_dim: int | None,
        projector_out_dim: int,
        temperature: float,
        base_momentum: float,
        contrastive_weight: float,
        freeze_backbone: bool,
        max_background: int,
        detr_all_layers: bool = True,
        detr_objectness: bool = False,
        detr_pseudo_classes: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(detector, AlignableDetector):
            raise TypeError(
                f"AlignDet: {type(detector).__name__} has no align_outputs / align_feature_dims / align_drop_keys"
            )
        if not 0.0 <= base_momentum <= 1.0:
            raise ValueError(f"AlignDet: base_momentum {base_momentum}; expected in [0, 1]")
        if temperature <= 0 or contrastive_weight < 0:
            raise ValueError(f"AlignDet: temperature {temperature}, contrastive_weight {contrastive_weight}")
        self.detector = detector
        self.temperature = float(temperature)
        self.base_momentum = float(base_momentum)
        self.contrastive_weight = float(contrastive_weight)
        self.freeze_backbone = bool(freeze_backbone)
        if max_background < 0:
            raise ValueError(f"AlignDet: max_background {max_background}; expected >= 0")
        self.options = AlignOptions(
            all_layers=bool(detr_all_layers),
            objectness=bool(detr_objectness),
            max_background=int(max_background),
            pseudo_classes=bool(detr_pseudo_classes),
        )
        self.feature_dims = dict(detector.align_feature_dims())
        self.projectors = nn.ModuleDict(
            {
                branch: projector(dim, projector_hidden_dim or dim, projector_out_dim)
                for branch, dim in self.feature_dims.items()
            }
        )
        if self.freeze_backbone:
            for p in image_domain_backbone(detector).parameters():
                p.requires_grad_(False)
        self.momentum_detector = copy.deepcopy(detector)
        self.momentum_projectors = copy.deepcopy(self.projectors)
        for p in [*self.momentum_detector.parameters(), *self.momentum_projectors.parameters()]:
            p.requires_grad_(False)
        self.train(self.training)

    # ---- the align protocol, called with this wrapper's options ----

    def align_drop_keys(self, detector: nn.Module | None = None) -> list[str]:
        """State-dict substrings fine-tuning leaves out of the online detector's weights (its classifiers)."""
        return list((self.detector if detector is None else detector).align_drop_keys(self.options))

    def align_outputs(
        self, detector: nn.Module, images: list[Tensor], targets: list[dict[str, Tensor]], with_losses: bool
    ) -> AlignOutputs:
        """One view through `detector` (the online one or its momentum copy)."""
        return detector.align_outputs(images, targets, with_losses, self.options)

    # ---- training ----

    def train(self, mode: bool = True) -> AlignDet:
        """The momentum copy follows the online one's mode; a frozen backbone keeps BatchNorm in eval mode."""
        super().train(mode)
        if self.freeze_backbone:
            image_domain_backbone(self.detector).eval()
            image_domain_backbone(self.momentum_detector).eval()
        return self

    def forward(
        self,
        images1: list[Tensor],
        targets1: list[dict[str, Tensor]],
        images2: list[Tensor],
        targets2: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        ids1, ids2 = batch_unique_ids(targets1, targets2)
        view1 = [{**t, "ids": ids} for t, ids in zip(targets1, ids1)]
        view2 = [{**t, "ids": ids} for t, ids in zip(targets2, ids2)]
        online = self.align_outputs(self.detector, images1, view1, with_losses=True)
        with torch.no_grad():
            momentum = self.align_outputs(self.momentum_detector, images2, view2, with_losses=False)
        losses = dict(online.losses)
        for branch, head in self.projectors.items():
            if branch not in online.features:
                raise KeyError(f"AlignDet: the detector returned no features for branch {branch!r}")
            q = head(online.features[branch])
            with torch.no_grad():
                k = self.momentum_projectors[branch](momentum.features[branch])
            loss = box_contrastive_loss(q, online.ids[branch], k, momentum.ids[branch], self.temperature)
            losses[f"align/loss_contrastive_{branch}"] = self.contrastive_weight * loss
        return losses

    def momentum(self, progress: float) -> float:
        return momentum_at(progress, self.base_momentum)

    @torch.no_grad()
    def update_momentum(self, progress: float) -> float:
        """momentum <- m momentum + (1 - m) online for every parameter of detector and projectors, m from the
        cosine schedule at `progress` (fraction of training done); buffers (BatchNorm statistics) are copied.
        Returns m."""
        m = self.momentum(progress)
        for online, target in ((self.detector, self.momentum_detector), (self.projectors, self.momentum_projectors)):
            for (name, p_online), (name_t, p_target) in zip(
                online.named_parameters(), target.named_parameters(), strict=True
            ):
                if name != name_t:
                    raise RuntimeError(f"AlignDet: parameter {name} of the online model meets {name_t}")
                p_target.lerp_(p_online.detach(), 1.0 - m)
            for b_online, b_target in zip(online.buffers(), target.buffers(), strict=True):
                b_target.copy_(b_online)
        return m
