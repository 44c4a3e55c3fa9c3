"""DeformableTransformer: encode once, decode several times, masks, proposals and look-forward-twice."""

import copy

import torch
from torchvision.ops import MLP

from models.layers.deformable_transformer import DeformableTransformer

D, LEVELS = 16, 2


def _transformer() -> DeformableTransformer:
    torch.manual_seed(0)
    return DeformableTransformer(
        d_model=D,
        num_heads=2,
        num_encoder_layers=1,
        num_decoder_layers=3,
        dim_feedforward=32,
        dropout=0.0,
        num_feature_levels=LEVELS,
        num_points=2,
    ).eval()


def _inputs(batch: int = 2):
    g = torch.Generator().manual_seed(1)
    srcs = [torch.randn(batch, D, 6, 8, generator=g), torch.randn(batch, D, 3, 4, generator=g)]
    masks = [torch.zeros(batch, 6, 8, dtype=torch.bool), torch.zeros(batch, 3, 4, dtype=torch.bool)]
    masks[0][1, :, 6:] = True  # image 1 is narrower
    masks[1][1, :, 3:] = True
    pos = [torch.randn(s.shape, generator=g) for s in srcs]
    return srcs, masks, pos


def _heads(layers: int = 3, shared: bool = False) -> torch.nn.ModuleList:
    torch.manual_seed(2)
    head = MLP(D, [D, 4])
    return torch.nn.ModuleList(head if shared else copy.deepcopy(head) for _ in range(layers))


def _queries(batch: int = 2, num: int = 4):
    g = torch.Generator().manual_seed(3)
    ref = torch.cat(
        [0.2 + 0.6 * torch.rand(batch, num, 2, generator=g), 0.1 + 0.2 * torch.rand(batch, num, 2, generator=g)], -1
    )
    return torch.randn(batch, num, D, generator=g), torch.randn(batch, num, D, generator=g), ref


def test_encoded_memory_cuts_back_into_level_maps_and_masks():
    transformer = _transformer()
    srcs, masks, pos = _inputs()
    encoded = transformer.encode(srcs, masks, pos)
    assert encoded.memory.shape == (2, 6 * 8 + 3 * 4, D)
    assert encoded.level_start_index.tolist() == [0, 48]
    assert [tuple(m.shape) for m in encoded.level_maps()] == [(2, D, 6, 8), (2, D, 3, 4)]
    assert all(torch.equal(a, b) for a, b in zip(encoded.level_masks(), masks))
    assert torch.allclose(encoded.valid_ratios[1], torch.tensor([[0.75, 1.0], [0.75, 1.0]]))
    flat = torch.cat([m.flatten(2).transpose(1, 2) for m in encoded.level_maps()], 1)
    assert torch.equal(flat, encoded.memory)


def test_decoding_twice_on_one_memory_gives_the_same_result():
    transformer, heads = _transformer(), _heads()
    encoded = transformer.encode(*_inputs())
    memory = encoded.memory.clone()
    query, query_pos, ref = _queries()
    first = transformer.decode(encoded, query, query_pos, ref, heads)
    other = transformer.decode(encoded, *_queries(num=6), heads)
    second = transformer.decode(encoded, query, query_pos, ref, heads)
    assert torch.equal(encoded.memory, memory)
    assert first.boxes.shape == (3, 2, 4, 4) and other.boxes.shape == (3, 2, 6, 4) and first.logits is None
    assert torch.equal(first.boxes, second.boxes) and torch.equal(first.hidden_states, second.hidden_states)


def test_block_attention_mask_isolates_query_groups():
    transformer, heads = _transformer(), _heads()
    encoded = transformer.encode(*_inputs())
    qa, pa, ra = _queries(num=3)
    qb, pb, rb = (t.flip(1) + 0.1 for t in _queries(num=2))
    mask = torch.ones(5, 5, dtype=torch.bool)
    mask[:3, :3] = False
    mask[3:, 3:] = False
    joint = transformer.decode(
        encoded, torch.cat([qa, qb], 1), torch.cat([pa, pb], 1), torch.cat([ra, rb], 1), heads, attn_mask=mask
    )
    alone = transformer.decode(encoded, qa, pa, ra, heads)
    assert torch.allclose(joint.boxes[:, :, :3], alone.boxes, atol=1e-5)


def _box_head_grads_from_last_layer(look_forward_twice: bool) -> list[float]:
    """|grad| of each layer's box head from a loss on the last layer's boxes only."""
    transformer, heads = _transformer(), _heads()
    encoded = transformer.encode(*_inputs())
    decoded = transformer.decode(encoded, *_queries(), heads, look_forward_twice=look_forward_twice)
    decoded.boxes[-1].sum().backward()
    return [0.0 if h[-2].weight.grad is None else float(h[-2].weight.grad.abs().sum()) for h in heads]


def test_look_forward_twice_lets_a_layer_loss_train_the_previous_box_head_only():
    plain = _box_head_grads_from_last_layer(look_forward_twice=False)
    twice = _box_head_grads_from_last_layer(look_forward_twice=True)
    assert plain[0] == plain[1] == 0.0 and plain[2] > 0
    assert twice[0] == 0.0 and twice[1] > 0 and twice[2] > 0


def test_without_refinement_every_layer_refines_the_initial_reference():
    transformer, heads = _transformer(), _heads(shared=True)
    encoded = transformer.encode(*_inputs())
    query, query_pos, ref = _queries()
    decoded = transformer.decode(encoded, query, query_pos, ref, heads, refine=False)
    assert all(torch.equal(r, ref) for r in decoded.references)
    refined = transformer.decode(encoded, query, query_pos, ref, heads, refine=True)
    assert torch.allclose(refined.references[1], refined.boxes[0])


def test_point_references_give_boxes_sized_by_the_head():
    transformer, heads = _transformer(), _heads()
    encoded = transformer.encode(*_inputs())
    query, query_pos, ref = _queries()
    decoded = transformer.decode(encoded, query, query_pos, ref[..., :2], heads)
    assert decoded.boxes.shape == (3, 2, 4, 4) and decoded.references[1].shape == (2, 4, 4)


def test_encoder_proposals_are_invalid_on_padding_and_grow_per_level():
    transformer = _transformer()
    encoded = transformer.encode(*_inputs())
    boxes, valid = transformer.encoder_proposals(encoded)
    assert boxes.shape == (2, 60, 4)
    assert not valid[encoded.mask_flatten].any() and valid[0].all()
    assert torch.allclose(boxes[0, 48:, 2], 2 * boxes[0, :48, 2].mean().expand(12))
    # centres are normalised by the valid width, so image 1's valid centres span (0, 1) as well
    assert 0 < boxes[1][valid[1], 0].min() and boxes[1][valid[1], 0].max() < 1
