"""Deformable-DETR meta-architecture (torchvision-style forward), built so Co-DETR can reuse its pieces.

forward reads top to bottom: preprocess -> encode (backbone, neck, positions, encoder) -> initial queries
-> decode -> losses (training) or postprocess (eval). `align_outputs` serves AlignDet box-domain pre-training
(models/pretrain/align_outputs.py) from the same pieces.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import MLP, box_convert, clip_boxes_to_image

from models.errors import ModelConfigError
from models.layers.backbone import ResNetBackbone, pyramid_strides
from models.layers.box_coding import denormalize_boxes, inverse_sigmoid, normalize_boxes
from models.layers.deformable_transformer import Decoded, DeformableTransformer, Encoded
from models.layers.image_list import batch_images
from models.layers.position_encoding import SinePositionEncoding
from models.losses.detr_loss import SetCriterion, check_finite, name_layers, num_target_boxes
from models.pretrain.align_outputs import DEFAULT_ALIGN_OPTIONS, AlignOptions, AlignOutputs, with_background

# Focal-loss prior (RetinaNet): class logits start at sigmoid^-1(0.01), so the many negatives do not swamp the
# first steps.
CLASS_PRIOR_PROB = 0.01
# With point references the box size comes from the head alone: start at sigmoid(-2) = 0.12 of the image.
POINT_REFERENCE_LOG_SIZE = -2.0
# The AlignDet branch of the decoder's queries.
DETR_BRANCH = "detr"


@dataclass
class Queries:
    """Decoder inputs for the one-to-one queries: content and pos [B, Q, C], reference [B, Q, 4] boxes or
    [B, Q, 2] points (normalised, in (0, 1)); two-stage only: enc_logits [B, S, 1] (object or not),
    enc_boxes [B, S, 4] and enc_valid Bool[B, S] for every encoder location, for the encoder loss."""

    content: Tensor
    pos: Tensor
    reference: Tensor
    enc_logits: Tensor | None = None
    enc_boxes: Tensor | None = None
    enc_valid: Tensor | None = None


def _last_linear(head: nn.Module) -> nn.Linear:
    return [m for m in head.modules() if isinstance(m, nn.Linear)][-1]


def _box_head(d_model: int) -> MLP:
    """3-layer MLP to 4 box deltas, the last layer zeroed: a fresh head predicts its reference box."""
    head = MLP(d_model, [d_model, d_model, 4], activation_layer=nn.ReLU)
    last = _last_linear(head)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return head


def _class_head(d_model: int, num_classes: int) -> nn.Linear:
    head = nn.Linear(d_model, num_classes)
    nn.init.constant_(head.bias, -math.log((1 - CLASS_PRIOR_PROB) / CLASS_PRIOR_PROB))
    return head


def _per_layer(head: nn.Module, num_layers: int, separate: bool) -> nn.ModuleList:
    """One head per decoder layer: copies (box refinement) or the same module shared by all layers."""
    return nn.ModuleList(copy.deepcopy(head) if separate else head for _ in range(num_layers))


class DeformableDETR(nn.Module):
    """Deformable-DETR with the Deformable-DETR++ options (each off by default).

    Args:
        backbone: a ResNetBackbone (exposes out_channels and strides).
        neck: the channel mapper, or a callable `neck(in_channels=backbone.out_channels)` building it.
        transformer: DeformableTransformer.
        criterion: SetCriterion (the matcher lives inside it).
        position_encoding: SinePositionEncoding (maps, and boxes for two-stage queries).
        num_classes: K; class heads give K sigmoid logits (no background class).
        num_queries: Q one-to-one queries.
        with_box_refine: iterative box refinement, separate class/box heads per decoder layer (shared
            heads and fixed references otherwise).
        two_stage: the encoder proposes boxes (a 1-logit object head and a box head on every encoder location,
            trained with the binary-label encoder loss `*_enc`); the top-Q proposals become the decoder's
            reference boxes, and their sine embeddings give the queries' position (and content).
        mixed_query_selection: (DINO; needs two_stage) learned content queries; only the positions come from
            the top-Q proposals.
        look_forward_twice: (DINO; needs with_box_refine) see DeformableTransformer.decode.
        max_detections: detections kept per image at inference (top-k over queries x classes; no NMS).
        pixel_mean, pixel_std: RGB normalisation of the [0, 1] input images.
        size_divisibility: the padded batch's height and width are multiples of it.
        align_drop_class_keys, align_drop_keys: what a box-pretrained checkpoint leaves out of fine-tuning
            (`align_drop_keys()`): the class heads (kept when pre-trained as objectness heads) and the rest.

    forward(images: list of [3, H, W] in [0, 1], targets: list of {"boxes" xyxy pixels, "labels"} or None).
    Training: a dict of weighted losses, keys "detr/loss_{cls,bbox,giou}" (last layer), "..._d{l}" (earlier
    layers), "..._enc" (two-stage). Eval: per image {"boxes" [D, 4] xyxy pixels of that image, "scores" [D],
    "labels" [D]} with D = min(max_detections, Q x K).

    AlignDet branch "detr": the decoder's box predictions are Hungarian-matched to the proposals with a box-only
    cost (the matcher's L1 and GIoU weights; proposals have no class); its features are the decoder hidden
    states of the matched queries (every decoder layer, as the reference labels all six, or only the last:
    `AlignOptions.all_layers`); its losses are the L1 and GIoU losses on every decoder layer plus, two-stage, the
    class-agnostic encoder-proposal losses (`*_enc`). With `AlignOptions.pseudo_classes` the proposals' `labels`
    are pseudo-classes (cluster ids, 0..num_classes-1): the matching adds the matcher's class cost and every
    decoder layer's class head learns them with the focal loss (`detr/loss_cls*`); the heads are still dropped at
    fine-tuning (AlignDet's detr_pseudo_label setting). With `AlignOptions.objectness` every decoder layer's class
    head also learns the proposals as objects (each matched query a positive of every class logit, the others
    negatives: `detr/loss_objectness*`) and fine-tuning keeps those heads, so every class starts from "proposal
    or not" instead of the fresh head's uniform prior; without it the projector replaces the classifier and the
    class heads are dropped.
    """

    def __init__(
        self,
        backbone: ResNetBackbone,
        neck: nn.Module | Callable[..., nn.Module],
        transformer: DeformableTransformer,
        criterion: SetCriterion,
        position_encoding: SinePositionEncoding,
        num_classes: int,
        num_queries: int,
        with_box_refine: bool,
        two_stage: bool,
        mixed_query_selection: bool,
        look_forward_twice: bool,
        max_detections: int,
        pixel_mean: list[float],
        pixel_std: list[float],
        size_divisibility: int,
        align_drop_class_keys: Sequence[str],
        align_drop_keys: Sequence[str],
    ) -> None:
        super().__init__()
        if mixed_query_selection and not two_stage:
            raise ModelConfigError("mixed_query_selection", "true needs two_stage: true")
        if look_forward_twice and not with_box_refine:
            raise ModelConfigError("look_forward_twice", "true needs with_box_refine: true")
        self.backbone = backbone
        self.neck = neck if isinstance(neck, nn.Module) else neck(in_channels=backbone.out_channels)
        self.transformer = transformer
        self.criterion = criterion
        self.position_encoding = position_encoding
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.with_box_refine = with_box_refine
        self.two_stage = two_stage
        self.mixed_query_selection = mixed_query_selection
        self.look_forward_twice = look_forward_twice
        self.max_detections = max_detections
        self.size_divisibility = size_divisibility
        self.transfer_drop_class_keys = list(align_drop_class_keys)
        self.transfer_drop_keys = list(align_drop_keys)
        self.register_buffer(
            "pixel_mean", torch.tensor(list(pixel_mean), dtype=torch.float32).view(-1, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(list(pixel_std), dtype=torch.float32).view(-1, 1, 1), persistent=False
        )

        self.strides = pyramid_strides(backbone, transformer.num_feature_levels - len(backbone.strides))
        d = transformer.d_model
        num_layers = transformer.num_decoder_layers
        box_head = _box_head(d)
        if not two_stage:
            # Learned references are points: the first layer's size comes from the head's bias.
            nn.init.constant_(_last_linear(box_head).bias[2:], POINT_REFERENCE_LOG_SIZE)
        self.class_embed = _per_layer(_class_head(d, num_classes), num_layers, with_box_refine)
        self.bbox_embed = _per_layer(box_head, num_layers, with_box_refine)
        if with_box_refine and not two_stage:
            # Only layer 0 refines a point; later layers refine boxes and start at a zero delta.
            for head in self.bbox_embed[1:]:
                nn.init.zeros_(_last_linear(head).bias)

        if two_stage:
            self.enc_output = nn.Linear(d, d)
            self.enc_output_norm = nn.LayerNorm(d)
            self.enc_class_embed = _class_head(d, 1)
            self.enc_bbox_embed = _box_head(d)
            self.pos_trans = nn.Linear(2 * d, 2 * d)
            self.pos_trans_norm = nn.LayerNorm(2 * d)
            if mixed_query_selection:
                self.query_embed = nn.Embedding(num_queries, d)
        else:
            self.query_embed = nn.Embedding(num_queries, 2 * d)
            self.reference_points = nn.Linear(d, 2)
            nn.init.xavier_uniform_(self.reference_points.weight)
            nn.init.zeros_(self.reference_points.bias)

    # ---- pieces (Co-DETR reuses them) ----

    def preprocess(self, images: list[Tensor]) -> tuple[Tensor, Tensor, list[tuple[int, int]]]:
        """Normalise [0, 1] images and pad them into a batch: (tensor [B, 3, H, W], mask Bool[B, H, W] True on
        padding, [(h, w)] of each image)."""
        normalised = [(img.to(self.pixel_mean.device) - self.pixel_mean) / self.pixel_std for img in images]
        return batch_images(normalised, self.size_divisibility)

    def extract_features(self, tensor: Tensor, mask: Tensor) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Backbone + neck: per level (maps [B, C, h, w], masks Bool[B, h, w], sine positions [B, C, h, w])."""
        feats = self.neck(self.backbone(tensor))
        masks = [F.interpolate(mask[None].float(), size=f.shape[-2:]).to(torch.bool)[0] for f in feats]
        pos = [self.position_encoding(m) for m in masks]
        return feats, masks, pos

    def encode(self, tensor: Tensor, mask: Tensor) -> Encoded:
        """Features of a preprocessed batch through the transformer encoder."""
        return self.transformer.encode(*self.extract_features(tensor, mask))

    def initial_queries(self, encoded: Encoded) -> Queries:
        """The one-to-one queries: learned, or (two-stage) from the top-Q encoder proposals."""
        batch = encoded.memory.shape[0]
        d = self.transformer.d_model
        if not self.two_stage:
            query_pos, content = self.query_embed.weight.split(d, dim=1)
            query_pos = query_pos[None].expand(batch, -1, -1)
            content = content[None].expand(batch, -1, -1)
            return Queries(content=content, pos=query_pos, reference=self.reference_points(query_pos).sigmoid())

        proposals, valid = self.transformer.encoder_proposals(encoded)
        if self.num_queries > proposals.shape[1]:
            raise ValueError(
                f"DeformableDETR: {self.num_queries} queries but only {proposals.shape[1]} encoder locations; "
                "use larger images or fewer queries"
            )
        memory = encoded.memory.masked_fill(~valid[..., None], 0.0)
        memory = self.enc_output_norm(self.enc_output(memory))
        enc_logits = self.enc_class_embed(memory)
        enc_boxes = (self.enc_bbox_embed(memory) + inverse_sigmoid(proposals)).sigmoid()
        scores = enc_logits[..., 0].masked_fill(~valid, float("-inf"))
        topk = scores.topk(self.num_queries, dim=1).indices
        reference = torch.gather(enc_boxes, 1, topk[..., None].expand(-1, -1, 4)).detach()
        embedded = self.pos_trans_norm(self.pos_trans(self.position_encoding.encode_boxes(reference)))
        query_pos, content = embedded.split(d, dim=-1)
        if self.mixed_query_selection:
            content = self.query_embed.weight[None].expand(batch, -1, -1)
        return Queries(content, query_pos, reference, enc_logits, enc_boxes, valid)

    def decode_queries(
        self, encoded: Encoded, query: Tensor, query_pos: Tensor, reference: Tensor, attn_mask: Tensor | None = None
    ) -> Decoded:
        """One decoder pass with this model's heads and refinement settings (see DeformableTransformer.decode)."""
        return self.transformer.decode(
            encoded,
            query,
            query_pos,
            reference,
            self.bbox_embed,
            self.class_embed,
            attn_mask=attn_mask,
            refine=self.with_box_refine,
            look_forward_twice=self.look_forward_twice,
        )

    def normalise_targets(
        self, targets: list[dict[str, Tensor]], image_sizes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """Pixel xyxy targets -> {"labels", "boxes" normalised cxcywh} on the model's device."""
        device = self.pixel_mean.device
        return [
            {
                "labels": t["labels"].to(device=device, dtype=torch.int64),
                "boxes": normalize_boxes(t["boxes"].to(device=device, dtype=torch.float32).reshape(-1, 4), size),
            }
            for t, size in zip(targets, image_sizes)
        ]

    def detr_losses(self, decoded: Decoded, queries: Queries, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """The one-to-one set losses (normalised targets), keys prefixed "detr/"."""
        losses = self.criterion(
            decoded.logits, decoded.boxes, targets, queries.enc_logits, queries.enc_boxes, queries.enc_valid
        )
        return {f"detr/{name}": value for name, value in losses.items()}

    def top_detections(self, logits: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The top `max_detections` (query, class) pairs by sigmoid score: (scores [B, D], labels [B, D], boxes
        [B, D, 4] normalised cxcywh). logits [B, Q, K], boxes [B, Q, 4] normalised cxcywh (last decoder layer)."""
        num_classes = logits.shape[-1]
        prob = logits.float().sigmoid().flatten(1)
        k = min(self.max_detections, prob.shape[1])
        scores, index = prob.topk(k, dim=1)
        query = torch.div(index, num_classes, rounding_mode="floor")
        labels = index % num_classes
        chosen = torch.gather(boxes.float(), 1, query[..., None].expand(-1, -1, 4))
        return scores, labels, chosen

    @torch.no_grad()
    def postprocess(self, logits: Tensor, boxes: Tensor, image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """`top_detections` per image, boxes in that image's pixels."""
        scores, labels, chosen = self.top_detections(logits, boxes)
        results = []
        for i, size in enumerate(image_sizes):
            xyxy = clip_boxes_to_image(denormalize_boxes(chosen[i], size), size)
            results.append({"boxes": xyxy, "scores": scores[i], "labels": labels[i]})
        return results

    def predict_batch(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Inference on a batch of equally sized images, as one graph (no Python lists; what ONNX export traces):
        images [N, 3, H, W] in [0, 1] -> (scores [N, D], labels int64 [N, D], boxes [N, D, 4] xyxy pixels)."""
        height, width = images.shape[-2:]
        tensor = (images - self.pixel_mean) / self.pixel_std
        # The same zero padding to a multiple of size_divisibility as preprocess, marked in the mask.
        divisor = max(1, self.size_divisibility)
        pad_h, pad_w = (divisor - height % divisor) % divisor, (divisor - width % divisor) % divisor
        tensor = F.pad(tensor, (0, pad_w, 0, pad_h))
        mask = F.pad(
            images.new_zeros(images.shape[0], height, width, dtype=torch.bool), (0, pad_w, 0, pad_h), value=True
        )
        encoded = self.encode(tensor, mask)
        queries = self.initial_queries(encoded)
        decoded = self.decode_queries(encoded, queries.content, queries.pos, queries.reference)
        scores, labels, chosen = self.top_detections(decoded.logits[-1], decoded.boxes[-1])
        # Scaled coordinate by coordinate: a tensor built from (width, height) would fix the traced graph's size.
        x0, y0, x1, y1 = box_convert(chosen, "cxcywh", "xyxy").unbind(-1)
        xs = [(x * width).clamp(min=0, max=width) for x in (x0, x1)]
        ys = [(y * height).clamp(min=0, max=height) for y in (y0, y1)]
        return scores, labels, torch.stack([xs[0], ys[0], xs[1], ys[1]], dim=-1)

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if self.training and targets is None:
            raise ValueError("DeformableDETR: training mode needs targets")
        tensor, mask, sizes = self.preprocess(images)
        encoded = self.encode(tensor, mask)
        queries = self.initial_queries(encoded)
        decoded = self.decode_queries(encoded, queries.content, queries.pos, queries.reference)
        if self.training:
            return self.detr_losses(decoded, queries, self.normalise_targets(targets, sizes))
        return self.postprocess(decoded.logits[-1], decoded.boxes[-1], sizes)

    # ---- AlignDet box-domain pre-training (models/pretrain/align_outputs.py) ----

    def align_feature_dims(self) -> dict[str, int]:
        return {DETR_BRANCH: int(self.transformer.d_model)}

    def align_drop_keys(self, options: AlignOptions = DEFAULT_ALIGN_OPTIONS) -> list[str]:
        """State-dict key patterns (`stages.engine.checkpoint.drop_matches`) a box-pretrained checkpoint leaves out
        of fine-tuning: `align_drop_keys`, and `align_drop_class_keys` unless the class heads were pre-trained as
        objectness heads."""
        class_keys = [] if options.objectness else self.transfer_drop_class_keys
        return [*class_keys, *self.transfer_drop_keys]

    def align_outputs(
        self,
        images: list[Tensor],
        targets: list[dict[str, Tensor]],
        with_losses: bool,
        options: AlignOptions = DEFAULT_ALIGN_OPTIONS,
    ) -> AlignOutputs:
        """One view: every branch's features with proposal ids, and the box losses against the proposals when
        `with_losses`. Each image needs N <= num_queries proposals for each to get a query (the matcher pairs
        min(Q, N)). The encoder runs once; every branch reads the same memory."""
        tensor, mask, sizes = self.preprocess(images)
        out = self.align_encoded(self.encode(tensor, mask), sizes, targets, with_losses, options)
        if with_losses:
            check_finite(out.losses, f"{type(self).__name__}.align_outputs")
        return out

    def align_encoded(
        self,
        encoded: Encoded,
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
        with_losses: bool,
        options: AlignOptions,
    ) -> AlignOutputs:
        """The AlignDet branches of an encoded batch: here the "detr" branch (class docstring)."""
        device = self.pixel_mean.device
        ids = [t["ids"].to(device=device, dtype=torch.int64) for t in targets]
        one_class = self.normalise_targets(one_class_targets(targets, device), image_sizes)
        if options.pseudo_classes:
            check_pseudo_classes(targets, self.num_classes)
            proposals, matcher = self.normalise_targets(targets, image_sizes), self.criterion.matcher
        else:
            proposals, matcher = one_class, self.criterion.matcher.box_only()
        loss_names = ("loss_cls", "loss_bbox", "loss_giou") if options.pseudo_classes else ("loss_bbox", "loss_giou")
        queries = self.initial_queries(encoded)
        decoded = self.decode_queries(encoded, queries.content, queries.pos, queries.reference)
        num_layers = decoded.boxes.shape[0]
        labelled = range(num_layers) if options.all_layers else [num_layers - 1]
        num_boxes = num_target_boxes(proposals, decoded.boxes.device)
        out = AlignOutputs()
        features, feature_ids, background = [], [], []
        # The last layer alone, unless another one needs an assignment too: all layers are matched in one pass.
        first = 0 if with_losses or options.all_layers else num_layers - 1
        assignments = dict(
            enumerate(matcher.match_layers(decoded.logits[first:], decoded.boxes[first:], proposals), start=first)
        )
        for layer in labelled:
            # Image-major, queries ascending within an image: rows and ids are built from the same pairs.
            for image, (pred, tgt) in enumerate(assignments[layer]):
                pred = pred.to(decoded.boxes.device)
                features.append(decoded.hidden_states[layer, image, pred])
                feature_ids.append(ids[image][tgt.to(ids[image].device)])
                unmatched = torch.ones(decoded.hidden_states.shape[2], dtype=torch.bool, device=pred.device)
                unmatched[pred] = False
                background.append(decoded.hidden_states[layer, image, unmatched])
        if with_losses:
            indices = [assignments[layer] for layer in range(num_layers)]
            losses = self.criterion.layer_losses(decoded.logits, decoded.boxes, proposals, indices, num_boxes)
            kept = {name: losses[name] for name in loss_names}
            if options.objectness:
                kept["loss_objectness"] = torch.stack(
                    [
                        self.criterion.objectness_loss(decoded.logits[layer], indices[layer], num_boxes)
                        for layer in range(num_layers)
                    ]
                )
            out.losses.update({f"{DETR_BRANCH}/{key}": value for key, value in name_layers(kept).items()})
        out.features[DETR_BRANCH], out.ids[DETR_BRANCH] = with_background(
            torch.cat(features), torch.cat(feature_ids), torch.cat(background), options.max_background
        )
        if with_losses and queries.enc_logits is not None:
            # Two-stage: the encoder's object-or-not proposals learn the proposals as objects (like an RPN would).
            enc_losses, _ = self.criterion.match_and_loss(
                queries.enc_logits, queries.enc_boxes, one_class, num_boxes, queries.enc_valid
            )
            out.losses.update({f"{DETR_BRANCH}/{name}_enc": value for name, value in enc_losses.items()})
        return out


def check_pseudo_classes(targets: list[dict[str, Tensor]], num_classes: int) -> None:
    """Raise ValueError unless every target label is one of the detector's `num_classes` pseudo-classes."""
    for index, target in enumerate(targets):
        labels = target["labels"]
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(
                f"DeformableDETR: image {index} of the batch has pseudo-classes in [{int(labels.min())}, "
                f"{int(labels.max())}]; expected 0..{num_classes - 1} (the detector's num_classes)"
            )


def one_class_targets(targets: list[dict[str, Tensor]], device: torch.device) -> list[dict[str, Tensor]]:
    """AlignDet targets as detection targets of one class: their boxes, every label 0."""
    return [
        {"boxes": t["boxes"], "labels": torch.zeros(len(t["boxes"]), dtype=torch.int64, device=device)} for t in targets
    ]
