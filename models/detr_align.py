"""The AlignDet align protocol for the DETR family (DeformableDETR and CoDeformableDETR), as functions taking the
model as their first argument (see `models.align_outputs.AlignOutputs` and `models.aligndet.AlignDet`).

Branches:
- "detr": the decoder's box predictions are Hungarian-matched to the proposals with a box-only cost (the
  model's L1 and GIoU cost weights, no class cost: proposals have no class); the features are the decoder hidden
  states of the matched queries (every decoder layer, as the reference labels all six, or only the last); the
  losses are the model's L1 and GIoU losses on every decoder layer plus, for a two-stage model, its class-agnostic
  encoder-proposal losses (`*_enc`). With `objectness`, every decoder layer's class head also learns the proposals
  as objects: each matched query is a positive of every class logit, the other queries negatives (the model's focal
  loss, `detr/loss_objectness*`). Fine-tuning then keeps that head (see `detr_align_drop_keys`), so every class
  starts from "proposal-like or not" instead of from the fresh head's uniform prior; without it the projector
  replaces the classifier and the class heads are dropped.
- "aux{i}_{name}" (Co-DETR): the multi-scale adapter and auxiliary head i run on the same encoder memory with the
  proposals as targets (labels 0); the head's own assigner picks its positives, whose features (`AuxPositives`)
  carry the id of the proposal they were assigned; the losses are the head's own minus its classification loss.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from models.align_outputs import AlignOutputs
from models.detr import DeformableDETR
from models.detr_loss import check_finite, num_target_boxes
from models.heads.dense import DenseAuxHead
from models.heads.faster_rcnn import FasterRCNNHead
from models.matcher import HungarianMatcher

DETR_BRANCH = "detr"
# The loss an auxiliary head's classifier takes; its projector replaces the classifier in box pre-training.
AUX_CLASS_LOSS = "loss_cls"


def _check_model(model: nn.Module) -> DeformableDETR:
    if not isinstance(model, DeformableDETR):
        raise TypeError(
            f"{type(model).__name__} has no align_outputs and is not a DeformableDETR; AlignDet cannot wrap it"
        )
    return model


def _aux_heads(model: DeformableDETR) -> list[tuple[str, nn.Module]]:
    """(branch name, head) of a Co-DETR's auxiliary heads; empty for the plain DETR."""
    heads = getattr(model, "aux_heads", None)
    if heads is None or len(heads) == 0:
        return []
    return list(zip(model.aux_head_names, heads, strict=True))


def box_only_matcher(matcher: HungarianMatcher) -> HungarianMatcher:
    """The model's matcher with the class cost removed: L1 + GIoU only (proposals have no class)."""
    return HungarianMatcher(0.0, matcher.cost_bbox, matcher.cost_giou, matcher.focal_alpha, matcher.focal_gamma)


def detr_align_feature_dims(model: nn.Module) -> dict[str, int]:
    """{"detr": d_model} plus {"aux{i}_{name}": the head's input width} for a Co-DETR's auxiliary heads."""
    model = _check_model(model)
    dims = {DETR_BRANCH: int(model.transformer.d_model)}
    for name, head in _aux_heads(model):
        dims[name] = int(head.in_channels)
    return dims


def _classifier_prefixes(head: nn.Module) -> list[str]:
    """State-dict prefixes (inside the head) of an auxiliary head's class-specific predictors."""
    if isinstance(head, DenseAuxHead):
        return ["tower.cls_pred."]
    if isinstance(head, FasterRCNNHead):
        # Its box regressor is class-specific too ((C + 1) x 4 outputs), only slot 1 is trained on proposals.
        return ["box_predictor."]
    raise TypeError(f"detr_align: no classifier known for auxiliary head {type(head).__name__}")


def detr_align_drop_keys(model: nn.Module, objectness: bool = False) -> list[str]:
    """Substrings of the state-dict keys fine-tuning should not load: the class heads of every decoder layer
    (kept when they were pre-trained as objectness heads, `objectness`) and the auxiliary heads' classifiers. The
    two-stage encoder's one-logit object head is kept (class-agnostic)."""
    model = _check_model(model)
    keys = [] if objectness else [f"class_embed.{layer}." for layer in range(len(model.class_embed))]
    for index, (_, head) in enumerate(_aux_heads(model)):
        keys += [f"aux_heads.{index}.{prefix}" for prefix in _classifier_prefixes(head)]
    return keys


def _detr_branch(
    model: DeformableDETR,
    decoded,
    queries,
    targets: list[dict[str, Tensor]],
    ids: list[Tensor],
    with_losses: bool,
    all_layers: bool,
    objectness: bool,
    out: AlignOutputs,
) -> None:
    matcher = box_only_matcher(model.criterion.matcher)
    num_layers = decoded.boxes.shape[0]
    labelled = range(num_layers) if all_layers else [num_layers - 1]
    num_boxes = num_target_boxes(targets, decoded.boxes.device)
    features, feature_ids = [], []
    for layer in range(num_layers):
        if layer not in labelled and not with_losses:
            continue
        indices = matcher(None, decoded.boxes[layer], targets)
        if layer in labelled:
            # Image-major, queries ascending within an image: rows and ids are built from the same pairs.
            for image, (pred, tgt) in enumerate(indices):
                features.append(decoded.hidden_states[layer, image, pred.to(decoded.boxes.device)])
                feature_ids.append(ids[image][tgt.to(ids[image].device)])
        if with_losses:
            losses = model.criterion.loss_for_assignment(
                decoded.logits[layer], decoded.boxes[layer], targets, indices, num_boxes
            )
            suffix = "" if layer == num_layers - 1 else f"_d{layer}"
            for name in ("loss_bbox", "loss_giou"):
                out.losses[f"{DETR_BRANCH}/{name}{suffix}"] = losses[name]
            if objectness:
                out.losses[f"{DETR_BRANCH}/loss_objectness{suffix}"] = objectness_loss(
                    model, decoded.logits[layer], indices, num_boxes
                )
    out.features[DETR_BRANCH] = torch.cat(features)
    out.ids[DETR_BRANCH] = torch.cat(feature_ids)
    if with_losses and queries.enc_logits is not None:
        # Two-stage: the encoder's object-or-not proposals learn the proposals as objects (like an RPN would).
        binary = [{"labels": torch.zeros_like(t["labels"]), "boxes": t["boxes"]} for t in targets]
        enc_losses, _ = model.criterion.match_and_loss(
            queries.enc_logits, queries.enc_boxes, binary, num_boxes, queries.enc_valid
        )
        out.losses.update({f"{DETR_BRANCH}/{name}_enc": value for name, value in enc_losses.items()})


def objectness_loss(
    model: DeformableDETR, logits: Tensor, indices: list[tuple[Tensor, Tensor]], num_boxes: float
) -> Tensor:
    """The model's weighted focal loss with every class logit of a matched query as positive and every logit of
    the other queries as negative; logits [B, Q, C], indices from the box-only matcher."""
    criterion = model.criterion
    logits = logits.float()
    targets = torch.zeros_like(logits)
    for image, (pred, _) in enumerate(indices):
        targets[image, pred.to(logits.device)] = 1.0
    focal = sigmoid_focal_loss(
        logits, targets, alpha=criterion.focal_alpha, gamma=criterion.focal_gamma, reduction="sum"
    )
    # Normalised per class as well: the loss of one class head, whatever the number of classes.
    return criterion.weights["loss_cls"] * focal / (num_boxes * logits.shape[-1])


def _aux_branches(
    model: DeformableDETR,
    encoded,
    sizes: list[tuple[int, int]],
    targets: list[dict[str, Tensor]],
    ids: list[Tensor],
    with_losses: bool,
    out: AlignOutputs,
) -> None:
    maps = model.adapter(encoded.memory, encoded.spatial_shapes, encoded.level_start_index)
    device = model.pixel_mean.device
    pixel_targets = [
        {
            "boxes": t["boxes"].to(device=device, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.zeros(len(t["boxes"]), dtype=torch.int64, device=device),
        }
        for t in targets
    ]
    for name, head in _aux_heads(model):
        head_losses, positives = head(maps, model.aux_strides, sizes, pixel_targets)
        out.features[name] = torch.cat(positives.features)
        out.ids[name] = torch.cat(
            [image_ids[gt.to(image_ids.device)] for image_ids, gt in zip(ids, positives.gt_indices, strict=True)]
        )
        if with_losses:
            out.losses.update(
                {
                    f"{name}/{key}": model.head_loss_scale * value
                    for key, value in head_losses.items()
                    if key != AUX_CLASS_LOSS
                }
            )


def detr_align_outputs(
    model: nn.Module,
    images: list[Tensor],
    targets: list[dict[str, Tensor]],
    with_losses: bool,
    all_layers: bool = True,
    objectness: bool = False,
) -> AlignOutputs:
    """One view through a DeformableDETR (or CoDeformableDETR): branch features with proposal ids, and the box
    losses against the proposals when `with_losses`.

    targets: per image {"boxes" [N, 4] xyxy pixels of this view, "ids" int64 [N] (unique across the batch)}; any
    "labels" are ignored. `objectness`: also train the decoder class heads on the proposals (module docstring).
    Each image needs N <= num_queries for every proposal to get a query (the matcher pairs min(Q, N)). Runs the
    encoder once; the DETR branch and every auxiliary head read the same memory.
    """
    model = _check_model(model)
    device = model.pixel_mean.device
    ids = [t["ids"].to(device=device, dtype=torch.int64) for t in targets]
    labelled = [
        {"boxes": t["boxes"], "labels": torch.zeros(len(t["boxes"]), dtype=torch.int64, device=device)} for t in targets
    ]
    tensor, mask, sizes = model.preprocess(images)
    encoded = model.encode(tensor, mask)
    queries = model.initial_queries(encoded)
    decoded = model.decode_queries(encoded, queries.content, queries.pos, queries.reference)
    out = AlignOutputs()
    _detr_branch(
        model, decoded, queries, model.normalise_targets(labelled, sizes), ids, with_losses, all_layers, objectness, out
    )
    if _aux_heads(model):
        _aux_branches(model, encoded, sizes, targets, ids, with_losses, out)
    if with_losses:
        check_finite(out.losses, "detr_align")
    return out
