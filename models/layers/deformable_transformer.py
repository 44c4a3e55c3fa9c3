"""The Deformable-DETR transformer, with the encoder and the decoder callable apart.

`encode` runs once per image batch; `decode` can then run several times on the same memory (the one-to-one
queries, then one pass per Co-DETR auxiliary query group). The prediction heads are not part of the
transformer: the caller passes its per-layer box (and class) heads to `decode`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.layers.box_coding import inverse_sigmoid
from models.layers.image_list import size_table
from models.layers.ms_deform_attn import MSDeformAttn

# Two-stage proposals (Deformable-DETR): a square of side 0.05 * 2**level (normalised) at every encoder
# location; one whose coordinates leave this open range is invalid (never selected as a query).
PROPOSAL_BASE_SIZE = 0.05
PROPOSAL_VALID_RANGE = (0.01, 0.99)


@dataclass
class Encoded:
    """The encoder output and what a decoder pass (or a Co-DETR head) needs to read it.

    memory [B, S, C] (levels flattened one after another, finest first), mask_flatten Bool[B, S] True on
    padding, spatial_shapes Long[L, 2] of (h, w), level_start_index Long[L], valid_ratios [B, L, 2] as
    (w, h): the unpadded fraction of each level's map; shapes: spatial_shapes as Python ints.
    """

    memory: Tensor
    mask_flatten: Tensor
    spatial_shapes: Tensor
    level_start_index: Tensor
    valid_ratios: Tensor
    shapes: list[tuple[int, int]]

    def level_maps(self) -> list[Tensor]:
        """The memory cut back into per-level maps [B, C, h, w] (Co-DETR's multi-scale adapter)."""
        parts = self.memory.split([h * w for h, w in self.shapes], dim=1)
        return [p.transpose(1, 2).reshape(p.shape[0], p.shape[2], h, w) for p, (h, w) in zip(parts, self.shapes)]

    def level_masks(self) -> list[Tensor]:
        """Per-level padding masks Bool[B, h, w], True on padding."""
        parts = self.mask_flatten.split([h * w for h, w in self.shapes], dim=1)
        return [p.reshape(p.shape[0], h, w) for p, (h, w) in zip(parts, self.shapes)]


@dataclass
class Decoded:
    """One decoder pass, per layer: hidden_states [L, B, Q, C]; boxes [L, B, Q, 4] predicted normalised
    cxcywh in [0, 1]; logits [L, B, Q, K] or None when no class heads were passed; references: per layer,
    the [B, Q, 4] box (or [B, Q, 2] point) each layer's prediction refines (see DeformableTransformer.decode)."""

    hidden_states: Tensor
    boxes: Tensor
    logits: Tensor | None
    references: list[Tensor]


class _FFN(nn.Module):
    """Post-norm feed-forward block: x + dropout(W2 dropout(relu(W1 x))), then LayerNorm."""

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x))))))


class EncoderLayer(nn.Module):
    """Deformable self-attention over all levels + FFN, post-norm."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        dim_feedforward: int,
        dropout: float,
        num_levels: int,
        num_points: int,
        msda_backend: str = "auto",
    ) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, num_levels, num_heads, num_points, backend=msda_backend)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)
        self.ffn = _FFN(d_model, dim_feedforward, dropout)

    def forward(
        self, src: Tensor, pos: Tensor, reference_points: Tensor, shapes: list[tuple[int, int]], mask: Tensor
    ) -> Tensor:
        attn = self.self_attn(src + pos, reference_points, src, shapes, mask)
        return self.ffn(self.norm(src + self.dropout(attn)))


class DecoderLayer(nn.Module):
    """Self-attention among the queries, deformable cross-attention into the memory, FFN; post-norm."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        dim_feedforward: int,
        dropout: float,
        num_levels: int,
        num_points: int,
        msda_backend: str = "auto",
    ) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model, num_levels, num_heads, num_points, backend=msda_backend)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = _FFN(d_model, dim_feedforward, dropout)

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        shapes: list[tuple[int, int]],
        memory_mask: Tensor,
        attn_mask: Tensor | None,
    ) -> Tensor:
        q = k = tgt + query_pos
        attn = self.self_attn(q, k, tgt, attn_mask=attn_mask, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout1(attn))
        cross = self.cross_attn(tgt + query_pos, reference_points, memory, shapes, memory_mask)
        tgt = self.norm2(tgt + self.dropout2(cross))
        return self.ffn(tgt)


class DeformableTransformer(nn.Module):
    """Deformable-DETR encoder and decoder (post-norm, ReLU FFN).

    Args:
        d_model: width of every token.
        num_heads: attention heads (deformable and decoder self-attention).
        num_encoder_layers, num_decoder_layers: depths.
        dim_feedforward: hidden width of the FFNs.
        dropout: dropout in attention outputs and FFNs.
        num_feature_levels: number of input maps (each gets a learned level embedding).
        num_points: sampling points per head and level in deformable attention.
        msda_backend: deformable attention's sampling, "auto", "pytorch" (grid_sample) or "triton" (see
            models/layers/ms_deform_attn.py).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_encoder_layers: int,
        num_decoder_layers: int,
        dim_feedforward: int,
        dropout: float,
        num_feature_levels: int,
        num_points: int,
        msda_backend: str = "auto",
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.num_feature_levels = num_feature_levels
        self.num_decoder_layers = num_decoder_layers
        layer_args = (d_model, num_heads, dim_feedforward, dropout, num_feature_levels, num_points)
        self.encoder_layers = nn.ModuleList(
            EncoderLayer(*layer_args, msda_backend=msda_backend) for _ in range(num_encoder_layers)
        )
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(*layer_args, msda_backend=msda_backend) for _ in range(num_decoder_layers)
        )
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        nn.init.normal_(self.level_embed)
        for layer in self.decoder_layers:
            nn.init.xavier_uniform_(layer.self_attn.in_proj_weight)

    @staticmethod
    def _valid_ratios(mask: Tensor) -> Tensor:
        """mask Bool[B, h, w] -> [B, 2]: (valid width / w, valid height / h)."""
        _, h, w = mask.shape
        valid_h = (~mask[:, :, 0]).sum(1).to(torch.float32)
        valid_w = (~mask[:, 0, :]).sum(1).to(torch.float32)
        return torch.stack([valid_w / w, valid_h / h], -1)

    @staticmethod
    def _encoder_reference_points(shapes: list[tuple[int, int]], valid_ratios: Tensor) -> Tensor:
        """Centres of every location of every level, normalised by the valid size: [B, S, L, 2] as (x, y)."""
        device = valid_ratios.device
        points = []
        for level, (h, w) in enumerate(shapes):
            ys, xs = torch.meshgrid(
                torch.arange(h, dtype=torch.float32, device=device) + 0.5,
                torch.arange(w, dtype=torch.float32, device=device) + 0.5,
                indexing="ij",
            )
            ys = ys.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * h)
            xs = xs.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * w)
            points.append(torch.stack((xs, ys), -1))
        reference = torch.cat(points, 1)
        return reference[:, :, None] * valid_ratios[:, None]

    def encode(self, srcs: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor]) -> Encoded:
        """srcs [B, C, h_l, w_l], masks Bool[B, h_l, w_l] (True on padding), pos_embeds like srcs, per level."""
        if len(srcs) != self.num_feature_levels:
            raise ValueError(f"DeformableTransformer.encode: {len(srcs)} levels; expected {self.num_feature_levels}")
        # Sizes stay as the tensors report them (symbolic when exported with a dynamic image size).
        shapes = [(s.shape[-2], s.shape[-1]) for s in srcs]
        src_flatten = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        mask_flatten = torch.cat([m.flatten(1) for m in masks], 1)
        pos_flatten = torch.cat(
            [p.flatten(2).transpose(1, 2) + self.level_embed[lvl] for lvl, p in enumerate(pos_embeds)], 1
        )
        spatial_shapes = size_table(shapes, src_flatten, torch.long)
        level_start_index = torch.cat((spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([self._valid_ratios(m) for m in masks], 1)
        reference_points = self._encoder_reference_points(shapes, valid_ratios)
        memory = src_flatten
        for layer in self.encoder_layers:
            memory = layer(memory, pos_flatten, reference_points, shapes, mask_flatten)
        return Encoded(memory, mask_flatten, spatial_shapes, level_start_index, valid_ratios, shapes)

    def encoder_proposals(self, encoded: Encoded) -> tuple[Tensor, Tensor]:
        """Two-stage proposals: one box per encoder location, normalised cxcywh [B, S, 4], and valid Bool[B, S]
        (False on padding and where a coordinate leaves PROPOSAL_VALID_RANGE). Boxes are centred on the
        location, normalised by the image's valid size, with side PROPOSAL_BASE_SIZE * 2**level."""
        device = encoded.memory.device
        batch = encoded.memory.shape[0]
        masks = encoded.level_masks()
        proposals = []
        for level, (h, w) in enumerate(encoded.shapes):
            valid_h = (~masks[level][:, :, 0]).sum(1).to(torch.float32)
            valid_w = (~masks[level][:, 0, :]).sum(1).to(torch.float32)
            ys, xs = torch.meshgrid(
                torch.arange(h, dtype=torch.float32, device=device),
                torch.arange(w, dtype=torch.float32, device=device),
                indexing="ij",
            )
            centre = torch.stack([xs, ys], -1)[None] + 0.5  # [1, h, w, 2], pixel centres of the level
            scale = torch.stack([valid_w, valid_h], -1).view(batch, 1, 1, 2)
            centre = centre / scale
            size = torch.full_like(centre, PROPOSAL_BASE_SIZE * 2.0**level)
            proposals.append(torch.cat([centre, size], -1).view(batch, h * w, 4))
        boxes = torch.cat(proposals, 1)
        low, high = PROPOSAL_VALID_RANGE
        valid = ((boxes > low) & (boxes < high)).all(-1) & ~encoded.mask_flatten
        return boxes, valid

    def decode(
        self,
        encoded: Encoded,
        query: Tensor,
        query_pos: Tensor,
        reference_boxes: Tensor,
        bbox_embed: nn.ModuleList,
        class_embed: nn.ModuleList | None = None,
        attn_mask: Tensor | None = None,
        refine: bool = True,
        look_forward_twice: bool = False,
    ) -> Decoded:
        """Run the decoder over one query group on `encoded`.

        Args:
            query, query_pos: content and positional embeddings [B, Q, C]; query_pos is added before
                self- and cross-attention in every layer.
            reference_boxes: [B, Q, 4] normalised cxcywh in (0, 1) -- boxes, *not* logits -- or [B, Q, 2]
                normalised (cx, cy) points (Deformable-DETR's learned single-stage references: the first layer
                then samples around the points in pixel units of each level, and its box size comes from the
                head alone). Gradients flow into them as given (detach proposals before passing them).
            bbox_embed: one box head per layer, mapping [.., C] -> [.., 4] deltas in logit space:
                box_l = sigmoid(bbox_embed[l](h_l) + inverse_sigmoid(reference_l)) (only (cx, cy) get the
                reference's logit when it is a point).
            class_embed: one class head per layer ([.., C] -> [.., K] logits), or None.
            attn_mask: decoder self-attention mask, Bool [Q, Q] or [B * num_heads, Q, Q], True = blocked.
            refine: iterative box refinement: layer l+1 samples around box_l (detached). If False, every layer
                refines the same initial reference boxes.
            look_forward_twice: (DINO; needs refine) box_l for l >= 1 is computed from the previous layer's
                refined box *without* the detach, so the loss on layer l also trains the box head of layer
                l-1; the next layer's sampling reference stays detached.

        Returns a Decoded; `references[l]` is the box (or point) that box_l refines (under look-forward-twice,
        the undetached refined box of layer l-1).
        """
        if look_forward_twice and not refine:
            raise ValueError("DeformableTransformer.decode: look_forward_twice needs refine=True")
        if len(bbox_embed) != self.num_decoder_layers:
            raise ValueError(f"decode: {len(bbox_embed)} box heads for {self.num_decoder_layers} decoder layers")
        if reference_boxes.shape[-1] not in (2, 4):
            raise ValueError(f"decode: reference_boxes last dim {reference_boxes.shape[-1]}; expected 4 or 2")
        reference = reference_boxes
        previous_refined = None
        hidden, boxes, logits, references = [], [], [], []
        tgt = query
        for lid, layer in enumerate(self.decoder_layers):
            tgt = layer(
                tgt,
                query_pos,
                self._per_level(reference, encoded.valid_ratios),
                encoded.memory,
                encoded.shapes,
                encoded.mask_flatten,
                attn_mask,
            )
            delta = bbox_embed[lid](tgt)
            refined = _refine(delta, reference)
            if look_forward_twice and previous_refined is not None:
                references.append(previous_refined)
                boxes.append(_refine(delta, previous_refined))
            else:
                references.append(reference)
                boxes.append(refined)
            if class_embed is not None:
                logits.append(class_embed[lid](tgt))
            hidden.append(tgt)
            if refine:
                previous_refined = refined
                reference = refined.detach()
        return Decoded(
            hidden_states=torch.stack(hidden),
            boxes=torch.stack(boxes),
            logits=torch.stack(logits) if class_embed is not None else None,
            references=references,
        )

    @staticmethod
    def _per_level(reference: Tensor, valid_ratios: Tensor) -> Tensor:
        """[B, Q, 2|4] normalised to the valid image -> [B, Q, L, 2|4] normalised to each padded level map."""
        ratios = valid_ratios if reference.shape[-1] == 2 else torch.cat([valid_ratios, valid_ratios], -1)
        return reference[:, :, None] * ratios[:, None]


def _refine(delta: Tensor, reference: Tensor) -> Tensor:
    """sigmoid(delta + logit(reference)); a point reference [.., 2] shifts only the centre."""
    if reference.shape[-1] == 2:
        return torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], -1).sigmoid()
    return (delta + inverse_sigmoid(reference)).sigmoid()
