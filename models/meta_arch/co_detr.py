"""Co-DETR (collaborative hybrid assignments, ICCV 2023) on the Deformable-DETR: Co-Deformable-DETR.

Training reads top to bottom: preprocess -> encode -> one-to-one queries decoded, DETR losses (`detr/`) ->
multi-scale adapter on the encoder memory -> for each auxiliary head i: its one-to-many losses
(`aux{i}_{name}/`) and its positives -> customised positive queries -> one more pass of the shared decoder ->
losses under the head's own assignment (`aux{i}_{name}_queries/`). Evaluation is the parent's path, untouched: no
auxiliary module runs, so a Co-DETR checkpoint predicts exactly like the plain DETR it contains. Box-domain
pre-training (`align_outputs`) runs the same heads through the same `run_aux_heads` as training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops import clip_boxes_to_image

from models.errors import ModelConfigError
from models.heads.base import AuxHead, AuxPositives
from models.heads.common import random_subset
from models.layers.box_coding import normalize_boxes
from models.layers.deformable_transformer import Decoded, Encoded
from models.losses.detr_loss import name_layers, num_target_boxes
from models.meta_arch.deformable_detr import DeformableDETR, one_class_targets
from models.pretrain.align_outputs import DEFAULT_ALIGN_OPTIONS, AlignOptions, AlignOutputs


@dataclass
class QueryGroup:
    """One auxiliary head's customised positive queries for a batch, N per image (Co-DETR §3.3).

    - `reference` [B, N, 4]: normalised cxcywh reference boxes: the head's anchors / proposals / point boxes,
      clipped to their image and divided by its unpadded (h, w), the convention of the DETR's targets.
    - `features` [B, N, C]: the head's feature of each query (zeros for filler slots).
    - `targets`: per image {"labels" [P_i], "boxes" [P_i, 4] normalised cxcywh}: the class and box the head's
      assigner gave each kept positive. Queries 0..P_i-1 of image i are its positives in that order; the
      rest of the group are the head's negatives (background, no box loss), then filler slots.
    - `valid` Bool[B, N]: False on filler slots (the head had too few negatives to pad the group); they take no
      loss and no other query attends to them.
    - `kept`: per image, int64 [P_i] indices into the head's `AuxPositives` lists of the positives kept
      (all of them, or a random `max_pos_queries`).
    - `num_negatives`: per image, negatives used as padding.
    """

    reference: Tensor
    features: Tensor
    targets: list[dict[str, Tensor]]
    valid: Tensor
    kept: list[Tensor]
    num_negatives: list[int]

    def indices(self) -> list[tuple[Tensor, Tensor]]:
        """(query index, target index) pairs per image for SetCriterion.loss_for_assignment: query j <-> target j
        (int64 host tensors, as the matcher gives them)."""
        return [(torch.arange(len(t["labels"])),) * 2 for t in self.targets]

    def has_fillers(self) -> bool:
        return not bool(self.valid.all())


def _build(module: nn.Module | Callable[[], nn.Module]) -> nn.Module:
    """A module as given, or built now from a zero-argument factory (e.g. a Hydra `_partial_` config)."""
    return module if isinstance(module, nn.Module) else module()


class CoDeformableDETR(DeformableDETR):
    """Deformable-DETR trained with K auxiliary one-to-many heads and their customised positive queries.

    Args:
        aux_heads: the K auxiliary heads (AuxHead), or zero-argument factories of them. Factories are built after
            the DETR, so its initial weights do not depend on K for a given seed. K = 0 gives exactly the
            parent model: the same parameters, losses and predictions.
        aux_head_names: one loss-key prefix per head, e.g. ["aux0_atss", "aux1_faster_rcnn"].
        adapter: MultiScaleAdapter (or a factory of it, built only when K > 0): encoder memory -> the heads'
            maps. Its output strides for this DETR's levels must equal every head's strides.
        lambda1: weight of the customised-query decoder losses (Eq. 6).
        lambda2: weight of the auxiliary head losses (Eq. 6). The paper sums that term over the L decoder
            layers, so the heads' own weighted losses are multiplied by lambda2 x L, L this model's decoder
            depth (the reference folds 2 x 6 = 12 into its head weights, for its 6 layers).
        max_pos_queries: positives kept per image and head (a random subset beyond it; the reference's 300).
        min_pos_queries: the smallest group size N (the reference's 9); N = the batch's largest kept positive
            count, clamped to [min_pos_queries, max_pos_queries], each image padded with its negatives.
        with_pos_feature: add LayerNorm(Linear(feature)) of each positive's head feature to its query content.
        **detr_args: the DeformableDETR arguments (backbone, neck, transformer, criterion, ...).

    Customised queries of head i (Eq. 4): content and position are the two halves of
    LayerNorm_i(Linear_i(sine embedding of the reference box)) (the parent's two-stage query split), the
    reference box itself is the decoder's reference (refinement and look-forward-twice as the one-to-one
    pass), and every decoder layer is supervised with the head's assignment (SetCriterion.loss_for_assignment,
    normalised by the group's positive count as the reference's `loss_single_aux`). Not kept from the reference:
    its `head_pos_embed` (a documented bug that adds a learned scalar to head 0's query positions only).

    Training returns the parent's `detr/...` losses plus, for head i named p: `p/<head loss>` (times
    lambda2 x L) and `p_queries/loss_{cls,bbox,giou}[_d{l}]` (times lambda1).
    """

    def __init__(
        self,
        *,
        aux_heads: Sequence[nn.Module | Callable[[], nn.Module]] = (),
        aux_head_names: Sequence[str] = (),
        adapter: nn.Module | Callable[[], nn.Module] | None = None,
        lambda1: float,
        lambda2: float,
        max_pos_queries: int,
        min_pos_queries: int,
        with_pos_feature: bool,
        **detr_args: Any,
    ) -> None:
        super().__init__(**detr_args)
        if len(aux_heads) != len(aux_head_names):
            raise ValueError(f"CoDeformableDETR: {len(aux_heads)} aux heads but {len(aux_head_names)} names")
        for argument, value in (("lambda1", lambda1), ("lambda2", lambda2)):
            if value < 0:
                raise ModelConfigError(argument, f"got {value}; expected >= 0")
        if not 1 <= min_pos_queries <= max_pos_queries:
            raise ModelConfigError(
                "min_pos_queries",
                f"{min_pos_queries} with max_pos_queries {max_pos_queries}; expected 1 <= min_pos_queries <= "
                "max_pos_queries",
            )
        self.aux_head_names = list(aux_head_names)
        self.lambda1 = lambda1
        self.head_loss_scale = lambda2 * self.transformer.num_decoder_layers
        self.max_pos_queries = max_pos_queries
        self.min_pos_queries = min_pos_queries
        self.with_pos_feature = with_pos_feature
        # K = 0 registers nothing: the state dict (and the RNG draws at construction) equal the parent's.
        self.adapter: nn.Module | None = None
        self.aux_heads = nn.ModuleList()
        self.aux_query_embed = nn.ModuleList()
        self.aux_query_norm = nn.ModuleList()
        self.aux_feature_proj = nn.ModuleList()
        self.aux_feature_norm = nn.ModuleList()
        self.aux_strides: list[int] = []
        if not aux_heads:
            return
        if adapter is None:
            raise ValueError("CoDeformableDETR: auxiliary heads need an adapter")
        self.adapter = _build(adapter)
        self.aux_strides = list(self.adapter.output_strides(self.strides))
        d = self.transformer.d_model
        for name, head in zip(self.aux_head_names, aux_heads):
            head = _build(head)
            if not isinstance(head, AuxHead):
                raise TypeError(f"CoDeformableDETR: head {name} is a {type(head).__name__}; expected an AuxHead")
            if list(head.strides) != self.aux_strides:
                raise ModelConfigError(
                    "aux_heads",
                    f"head {name} was built for strides {list(head.strides)}; the adapter's maps for this DETR's "
                    f"levels have strides {self.aux_strides}",
                )
            self.aux_heads.append(head)
            self.aux_query_embed.append(nn.Linear(2 * d, 2 * d))
            self.aux_query_norm.append(nn.LayerNorm(2 * d))
            if with_pos_feature:
                self.aux_feature_proj.append(nn.Linear(head.in_channels, d))
                self.aux_feature_norm.append(nn.LayerNorm(d))

    @property
    def num_aux_heads(self) -> int:
        return len(self.aux_heads)

    # ---- customised positive queries ----

    def build_query_group(self, positives: AuxPositives, image_sizes: list[tuple[int, int]]) -> QueryGroup:
        """Cap, pad and normalise one head's positives into a QueryGroup (see its docstring for the layout).

        Boxes are handled in float32 (also under autocast). Random choices (which positives beyond
        `max_pos_queries`, which negatives as padding) use torch's global RNG."""
        device = self.pixel_mean.device
        kept = [
            random_subset(torch.arange(n, device=device), self.max_pos_queries).sort().values
            for n in positives.num_positives()
        ]
        size = max(len(k) for k in kept)
        size = min(max(size, self.min_pos_queries), self.max_pos_queries)
        channels = positives.features[0].shape[-1]
        references, features, targets, valid, num_negatives = [], [], [], [], []
        for i, (pos, (h, w)) in enumerate(zip(kept, image_sizes)):
            neg_boxes, neg_feats = positives.negative_boxes[i], positives.negative_features[i]
            neg = random_subset(torch.arange(len(neg_boxes), device=device), size - len(pos))
            fill = size - len(pos) - len(neg)
            # Filler slots (too few negatives) get the whole image as their box; they are masked out below.
            filler_boxes = torch.tensor([[0.0, 0.0, float(w), float(h)]], device=device).expand(fill, 4)
            boxes = torch.cat([positives.boxes[i][pos].float(), neg_boxes[neg].float(), filler_boxes])
            references.append(normalize_boxes(clip_boxes_to_image(boxes, (h, w)), (h, w)))
            feats = [positives.features[i][pos], neg_feats[neg]]
            features.append(torch.cat([f.to(feats[0].dtype) for f in feats] + [feats[0].new_zeros(fill, channels)]))
            targets.append(
                {
                    "labels": positives.labels[i][pos].to(device=device, dtype=torch.int64),
                    "boxes": normalize_boxes(positives.target_boxes[i][pos].to(device, torch.float32), (h, w)),
                }
            )
            image_valid = torch.ones(size, dtype=torch.bool, device=device)
            image_valid[size - fill :] = False
            valid.append(image_valid)
            num_negatives.append(len(neg))
        return QueryGroup(
            reference=torch.stack(references),
            features=torch.stack(features),
            targets=targets,
            valid=torch.stack(valid),
            kept=kept,
            num_negatives=num_negatives,
        )

    def positive_queries(self, head_index: int, group: QueryGroup) -> tuple[Tensor, Tensor]:
        """(content, position) [B, N, C] of head `head_index`'s customised queries (Eq. 4)."""
        d = self.transformer.d_model
        embedded = self.position_encoding.encode_boxes(group.reference)
        embedded = self.aux_query_norm[head_index](self.aux_query_embed[head_index](embedded))
        query_pos, content = embedded.split(d, dim=-1)
        if self.with_pos_feature:
            feature = self.aux_feature_proj[head_index](group.features)
            content = content + self.aux_feature_norm[head_index](feature)
        return content, query_pos

    def filler_attention_mask(self, group: QueryGroup) -> Tensor | None:
        """Decoder self-attention mask [B * heads, N, N] (True = blocked) hiding filler slots from every other
        query (a filler still sees itself, so no row is fully blocked); None when the group has no fillers."""
        if not group.has_fillers():
            return None
        size = group.valid.shape[1]
        blocked = (~group.valid)[:, None, :].expand(-1, size, -1).clone()
        blocked &= ~torch.eye(size, dtype=torch.bool, device=blocked.device)
        num_heads = self.transformer.decoder_layers[0].self_attn.num_heads
        return blocked.repeat_interleave(num_heads, dim=0)

    def query_losses(self, decoded: Decoded, group: QueryGroup) -> dict[str, Tensor]:
        """lambda1 x the set losses of every decoder layer under the head's assignment (no matching).

        Keys as SetCriterion's: "loss_{cls,bbox,giou}" (last layer) and "..._d{l}"; normalised by the group's
        positive count (averaged over ranks, at least 1)."""
        num_positives = num_target_boxes(group.targets, decoded.boxes.device)
        valid = group.valid if group.has_fillers() else None
        indices = [group.indices()] * decoded.boxes.shape[0]
        losses = self.criterion.layer_losses(
            decoded.logits, decoded.boxes, group.targets, indices, num_positives, valid
        )
        return {name: self.lambda1 * value for name, value in name_layers(losses).items()}

    def run_aux_heads(
        self, encoded: Encoded, image_sizes: list[tuple[int, int]], targets: list[dict[str, Tensor]]
    ) -> Iterator[tuple[int, str, dict[str, Tensor], AuxPositives]]:
        """Every auxiliary head on the adapter's maps of `encoded`, one at a time: (index, name, its losses times
        lambda2 x L, its positives). A generator, so that the caller's work on one head
        happens before the next head runs (random draws stay in that order).

        targets: per image {"boxes" [G, 4] xyxy pixels, "labels" [G]}."""
        maps = self.adapter(encoded.memory, encoded.spatial_shapes, encoded.level_start_index)
        device = self.pixel_mean.device
        pixel_targets = [
            {
                "boxes": t["boxes"].to(device=device, dtype=torch.float32).reshape(-1, 4),
                "labels": t["labels"].to(device=device, dtype=torch.int64),
            }
            for t in targets
        ]
        for index, (name, head) in enumerate(zip(self.aux_head_names, self.aux_heads)):
            head_losses, positives = head(maps, self.aux_strides, image_sizes, pixel_targets)
            yield index, name, {key: self.head_loss_scale * value for key, value in head_losses.items()}, positives

    def auxiliary_losses(
        self, encoded: Encoded, image_sizes: list[tuple[int, int]], targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """Every auxiliary head's own losses and its customised-query losses, keys prefixed by the head's name.

        targets: per image {"boxes" [G, 4] xyxy pixels, "labels" [G]}."""
        losses: dict[str, Tensor] = {}
        for index, name, head_losses, positives in self.run_aux_heads(encoded, image_sizes, targets):
            losses.update({f"{name}/{key}": value for key, value in head_losses.items()})
            group = self.build_query_group(positives, image_sizes)
            content, query_pos = self.positive_queries(index, group)
            decoded = self.decode_queries(
                encoded, content, query_pos, group.reference, attn_mask=self.filler_attention_mask(group)
            )
            losses.update({f"{name}_queries/{key}": value for key, value in self.query_losses(decoded, group).items()})
        return losses

    # ---- AlignDet: the parent's "detr" branch plus one branch per auxiliary head ----

    def align_feature_dims(self) -> dict[str, int]:
        """The parent's, plus {"aux{i}_{name}": the head's input width}."""
        dims = super().align_feature_dims()
        dims.update({name: int(head.in_channels) for name, head in zip(self.aux_head_names, self.aux_heads)})
        return dims

    def align_drop_keys(self, options: AlignOptions = DEFAULT_ALIGN_OPTIONS) -> list[str]:
        """The parent's, plus every auxiliary head's classifier."""
        keys = super().align_drop_keys(options)
        for index, head in enumerate(self.aux_heads):
            keys += [f"aux_heads.{index}.{prefix}" for prefix in head.align_drop_keys()]
        return keys

    def align_encoded(
        self,
        encoded: Encoded,
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
        with_losses: bool,
        options: AlignOptions,
    ) -> AlignOutputs:
        """Branch "aux{i}_{name}": auxiliary head i on the same encoder memory with the proposals as targets (one
        class); its own assigner picks its positives, whose features carry the id of the proposal they were
        assigned; its losses are the head's own but for its classification loss."""
        out = super().align_encoded(encoded, image_sizes, targets, with_losses, options)
        if not self.num_aux_heads:
            return out
        device = self.pixel_mean.device
        ids = [t["ids"].to(device=device, dtype=torch.int64) for t in targets]
        proposals = one_class_targets(targets, device)
        for index, name, head_losses, positives in self.run_aux_heads(encoded, image_sizes, proposals):
            out.features[name] = torch.cat(positives.features)
            out.ids[name] = torch.cat(
                [image_ids[gt.to(image_ids.device)] for image_ids, gt in zip(ids, positives.gt_indices, strict=True)]
            )
            if with_losses:
                skip = self.aux_heads[index].classification_loss_key
                out.losses.update({f"{name}/{key}": value for key, value in head_losses.items() if key != skip})
        return out

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if not (self.training and self.num_aux_heads):
            return super().forward(images, targets)  # inference, and K = 0: the plain Deformable-DETR
        if targets is None:
            raise ValueError("CoDeformableDETR: training mode needs targets")
        tensor, mask, sizes = self.preprocess(images)
        encoded = self.encode(tensor, mask)
        queries = self.initial_queries(encoded)
        decoded = self.decode_queries(encoded, queries.content, queries.pos, queries.reference)
        losses = self.detr_losses(decoded, queries, self.normalise_targets(targets, sizes))
        losses.update(self.auxiliary_losses(encoded, sizes, targets))
        return losses
