"""Batching with padding masks, the ResNet backbone, the channel mapper and sine position encodings."""

import pytest
import torch
import torchvision

from models.layers.backbone import ResNetBackbone
from models.layers.image_list import batch_images
from models.layers.neck import ChannelMapper
from models.layers.position_encoding import SinePositionEncoding


def test_batch_images_pads_to_a_multiple_and_masks_the_padding():
    a, b = torch.rand(3, 50, 70), torch.rand(3, 64, 33)
    batch, mask, sizes = batch_images([a, b], size_divisibility=32)
    assert batch.shape == (2, 3, 64, 96) and mask.shape == (2, 64, 96)
    assert sizes == [(50, 70), (64, 33)]
    assert torch.equal(batch[0, :, :50, :70], a) and torch.equal(batch[1, :, :64, :33], b)
    assert not mask[0, :50, :70].any() and mask[0, 50:].all() and mask[0, :, 70:].all()
    assert not mask[1, :, :33].any() and mask[1, :, 33:].all()
    assert batch[0, :, 50:].abs().sum() == 0


def test_batch_images_without_divisibility_keeps_the_largest_size():
    batch, mask, _ = batch_images([torch.rand(3, 5, 7), torch.rand(3, 6, 4)], size_divisibility=0)
    assert batch.shape == (2, 3, 6, 7) and mask.sum() == 6 * 7 * 2 - 35 - 24


@pytest.mark.parametrize("depth", [18, 50])
def test_backbone_reports_channels_and_strides_of_its_maps(depth):
    backbone = ResNetBackbone(depth=depth, norm="frozen_bn", frozen_stages=1, out_levels=[3, 4, 5]).eval()
    maps = backbone(torch.rand(1, 3, 64, 96))
    assert [m.shape[1] for m in maps] == backbone.out_channels
    assert [64 // m.shape[2] for m in maps] == backbone.strides == [8, 16, 32]
    assert [96 // m.shape[3] for m in maps] == backbone.strides


def test_backbone_body_loads_a_torchvision_resnet_state_dict_by_name():
    backbone = ResNetBackbone(depth=18, norm="bn", frozen_stages=0, out_levels=[3, 4, 5])
    reference = torchvision.models.resnet18(weights=None)
    result = backbone.body.load_state_dict(reference.state_dict(), strict=False)
    assert result.missing_keys == []
    assert set(result.unexpected_keys) == {"fc.weight", "fc.bias"}
    assert torch.equal(backbone.state_dict()["body.layer1.0.conv1.weight"], reference.layer1[0].conv1.weight)


def test_frozen_stages_get_no_gradients_and_keep_bn_statistics_in_training():
    backbone = ResNetBackbone(depth=18, norm="bn", frozen_stages=2, out_levels=[3, 4, 5]).train()
    trainable = {name.split(".")[1] for name, p in backbone.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4"}
    assert not backbone.body.layer2[0].bn1.training and backbone.body.layer3[0].bn1.training
    before = backbone.body.layer1[0].bn1.running_mean.clone()
    backbone(torch.rand(2, 3, 64, 64))
    assert torch.equal(backbone.body.layer1[0].bn1.running_mean, before)


def test_channel_mapper_adds_stride_two_levels_at_the_common_width():
    neck = ChannelMapper(in_channels=[16, 24, 40], out_channels=32, num_outs=5, num_groups=8)
    maps = [torch.rand(2, 16, 16, 16), torch.rand(2, 24, 8, 8), torch.rand(2, 40, 4, 4)]
    outs = neck(maps)
    assert [tuple(o.shape) for o in outs] == [(2, 32, s, s) for s in (16, 8, 4, 2, 1)]


def _encoding() -> SinePositionEncoding:
    return SinePositionEncoding(d_model=16, temperature=10000, scale=6.283185307179586, offset=-0.5, eps=1e-6)


def test_map_encoding_of_an_image_ignores_the_padding_around_it():
    enc = _encoding()
    alone = enc(torch.zeros(1, 5, 6, dtype=torch.bool))
    padded_mask = torch.ones(1, 8, 9, dtype=torch.bool)
    padded_mask[:, :5, :6] = False
    padded = enc(padded_mask)
    assert alone.shape == (1, 16, 5, 6)
    assert torch.allclose(padded[:, :, :5, :6], alone, atol=1e-6)
    assert not torch.allclose(alone[:, :, 0, 0], alone[:, :, 4, 5])


def test_box_encoding_has_two_model_widths_and_tells_boxes_apart():
    enc = _encoding()
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.3]]])
    out = enc.encode_boxes(boxes)
    assert out.shape == (1, 2, 32)
    # (cx, cy, w, h) take 8 channels each, in that order: only the h block differs.
    assert torch.allclose(out[0, 0, :24], out[0, 1, :24]) and not torch.allclose(out[0, 0, 24:], out[0, 1, 24:])
