"""BYOL: the loss falls on a few synthetic images, the EMA target follows the hand-computed update, and the
image_pretrain config builds the model and its two-crop augmentation."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn

from models.ssl import BYOL, cosine_momentum
from stages.data.ssl_views import TwoCropTransform, TwoViewDataset

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _shape_images(n: int, size: int, seed: int) -> list[np.ndarray]:
    """HxWx3 uint8 images: a noisy background with a few filled rectangles and discs of random colours."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images = []
    for _ in range(n):
        image = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
        for _ in range(3):
            colour = rng.integers(80, 256, 3)
            cx, cy, r = rng.integers(8, size - 8, 2).tolist() + [int(rng.integers(4, size // 4))]
            if rng.random() < 0.5:
                image[max(0, cy - r) : cy + r, max(0, cx - r) : cx + r] = colour
            else:
                image[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = colour
        images.append(image)
    return images


class _Images:
    """The `load_image` side of a detection dataset."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def load_image(self, index):
        return self.images[index]


def _augmentation(crop_size: int) -> TwoCropTransform:
    return TwoCropTransform(
        crop_size=crop_size,
        scale=(0.3, 1.0),
        ratio=(0.75, 4 / 3),
        flip_prob=0.5,
        jitter_prob=0.8,
        brightness=0.4,
        contrast=0.4,
        saturation=0.2,
        hue=0.1,
        grayscale_prob=0.2,
        blur_probs=(1.0, 0.1),
        blur_sigma=(0.1, 2.0),
        blur_kernel_fraction=0.1,
        solarize_probs=(0.0, 0.2),
        solarize_threshold=0.5,
    )


def _resnet18_encoder() -> nn.Module:
    encoder = torchvision.models.resnet18(weights=None)
    encoder.fc = nn.Identity()  # forward then returns the pooled C5 features [B, 512]
    return encoder


def _byol(encoder: nn.Module, feature_dim: int, base_momentum: float = 0.99) -> BYOL:
    return BYOL(
        encoder,
        projector_hidden_dim=64,
        projector_out_dim=32,
        predictor_hidden_dim=64,
        base_momentum=base_momentum,
        final_momentum=1.0,
        pixel_mean=MEAN,
        pixel_std=STD,
        feature_dim=feature_dim,
    )


def test_byol_loss_decreases_on_synthetic_images():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    dataset = TwoViewDataset(_Images(_shape_images(4, 64, seed=1)), _augmentation(crop_size=48))
    model = _byol(_resnet18_encoder(), feature_dim=512).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    steps, losses = 30, []
    for step in range(steps):
        views = [dataset[i] for i in range(len(dataset))]
        view1, view2 = torch.stack([v[0] for v in views]), torch.stack([v[1] for v in views])
        loss = model(view1, view2)["ssl/loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.update_target(step / steps)
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.8 * first, (first, last, losses)


def test_cosine_momentum_runs_from_base_to_final():
    assert cosine_momentum(0.0, 0.99, 1.0) == pytest.approx(0.99)
    assert cosine_momentum(0.5, 0.99, 1.0) == pytest.approx(0.995)
    assert cosine_momentum(1.0, 0.99, 1.0) == pytest.approx(1.0)
    assert cosine_momentum(2.0, 0.99, 1.0) == pytest.approx(1.0)  # clamped past the end


def test_update_target_matches_hand_computed_ema():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model = _byol(encoder, feature_dim=4, base_momentum=0.9)
    online = [model.online_encoder, model.projector]
    target = [model.target_encoder, model.target_projector]
    for a, b in zip(online, target, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    with torch.no_grad():  # move the online network as a training step would
        for module in online:
            for p in module.parameters():
                p.add_(torch.randn_like(p))
    before_online = [p.clone() for m in online for p in m.parameters()]
    before_target = [p.clone() for m in target for p in m.parameters()]
    progress = 0.3
    tau = model.update_target(progress)
    expected_tau = 1 - (1 - 0.9) * (math.cos(math.pi * progress) + 1) / 2
    assert tau == pytest.approx(expected_tau)
    after_target = [p for m in target for p in m.parameters()]
    after_online = [p for m in online for p in m.parameters()]
    for t0, o0, t1, o1 in zip(before_target, before_online, after_target, after_online, strict=True):
        torch.testing.assert_close(t1, expected_tau * t0 + (1 - expected_tau) * o0)
        assert torch.equal(o1, o0)  # the online network is untouched


def test_target_network_gets_no_gradient_and_online_does():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU())
    model = _byol(encoder, feature_dim=8).train()
    model(torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32))["ssl/loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in model.target_encoder.parameters())
    assert all(p.grad is None for p in model.target_projector.parameters())
    assert model.online_encoder[0].weight.grad is not None and model.predictor[0].weight.grad is not None


def test_two_crop_transform_gives_two_different_unit_range_views():
    torch.manual_seed(0)
    view1, view2 = _augmentation(crop_size=40)(_shape_images(1, 64, seed=2)[0])
    for view in (view1, view2):
        assert view.shape == (3, 40, 40) and view.dtype == torch.float32
        assert 0.0 <= view.min() and view.max() <= 1.0
    assert not torch.equal(view1, view2)


def test_image_pretrain_config_builds_byol_and_augmentation():
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose("config", overrides=["stage=image_pretrain"])
    assert cfg.stage.name == "image_pretrain" and cfg.stage.method == "self_supervised"
    assert cfg.stage.weights is None and cfg.stage.init_from is None
    model = instantiate(cfg.stage.byol.model, encoder=_resnet18_encoder(), feature_dim=512)
    assert isinstance(model, BYOL) and model.projector[-1].out_features == cfg.stage.byol.model.projector_out_dim
    transform = instantiate(cfg.stage.byol.augmentation)
    view1, _ = transform(_shape_images(1, 128, seed=3)[0])
    assert view1.shape == (3, cfg.stage.byol.augmentation.crop_size, cfg.stage.byol.augmentation.crop_size)


def test_byol_wraps_the_pipeline_backbone_and_reads_its_c5_width():
    from models.backbone import ResNetBackbone

    torch.manual_seed(0)
    backbone = ResNetBackbone(depth=18, norm="bn", frozen_stages=1, out_levels=[3, 4, 5])
    model = _byol(backbone, feature_dim=None).train()
    assert model.projector[0].in_features == 512 and model.online_encoder is backbone
    model(torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32))["ssl/loss"].backward()
    assert backbone.body.layer1[0].conv1.weight.grad is None  # frozen stage stays frozen
    assert backbone.body.layer4[0].conv1.weight.grad is not None
