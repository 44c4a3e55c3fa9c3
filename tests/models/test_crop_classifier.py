"""Supervised image pre-training: ground-truth boxes become labelled crops, and the crop classifier learns them."""

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn

from models.pretrain.crop_classifier import CropClassifier
from stages.data.crops import GroundTruthCrops, context_box
from tests.helpers import CONF_DIR

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
COLOURS = [(255, 0, 0), (0, 0, 255)]  # class 0 red, class 1 blue


class _Detections:
    """The detection-dataset interface GroundTruthCrops uses: a red or blue square per box on grey images."""

    num_classes = 2

    def __init__(self, num_images: int = 4, size: int = 64):
        rng = np.random.default_rng(0)
        self.images, self.targets = [], []
        for i in range(num_images):
            image = np.full((size, size + 8, 3), 128, np.uint8)
            boxes, labels = [], []
            for j, side in enumerate((20, 12, 2)):  # the 2-pixel box is below min_box_size
                x0, y0 = int(rng.integers(0, size - side)), 4 + 22 * j
                label = (i + j) % 2
                image[y0 : y0 + side, x0 : x0 + side] = COLOURS[label]
                boxes.append([x0, y0, x0 + side, y0 + side])
                labels.append(label)
            self.images.append(image)
            self.targets.append({"boxes": np.array(boxes, np.float32), "labels": np.array(labels, np.int64)})

    def __len__(self):
        return len(self.images)

    def load_image(self, index):
        return self.images[index]

    def raw_target(self, index):
        return self.targets[index]


def test_ground_truth_crops_cut_each_large_enough_box_with_its_label():
    source = _Detections()
    crops = GroundTruthCrops(source, crop_size=16, context=0.0, min_box_size=4, flip_prob=0.0)
    assert len(crops) == 2 * len(source)  # the 2-pixel boxes are skipped
    for k in range(len(crops)):
        crop, label = crops[k]
        assert crop.shape == (3, 16, 16) and crop.dtype == torch.float32 and label.dtype == torch.int64
        expected = torch.tensor(COLOURS[int(label)], dtype=torch.float32) / 255
        torch.testing.assert_close(crop[:, 4:12, 4:12].mean(dim=(1, 2)), expected, atol=0.02, rtol=0)


def test_context_box_grows_by_the_fraction_and_stays_inside_the_image():
    assert context_box([10, 20, 30, 60], 0.1, 100, 100) == (16, 8, 48, 24)
    assert context_box([0, 0, 10, 10], 0.5, 12, 12) == (0, 0, 12, 12)


def test_crop_classifier_learns_the_crop_colours():
    torch.manual_seed(0)
    crops = GroundTruthCrops(_Detections(), crop_size=16, context=0.1, min_box_size=4, flip_prob=0.5)
    encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    model = CropClassifier(encoder, num_classes=2, pixel_mean=MEAN, pixel_std=STD, feature_dim=8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = [crops[k] for k in range(len(crops))]
    images, labels = torch.stack([c for c, _ in batch]), torch.stack([t for _, t in batch])
    losses = []
    for _ in range(40):
        out = model(images, labels)
        optimizer.zero_grad()
        out["cls/loss"].backward()
        optimizer.step()
        losses.append(out["cls/loss"].item())
    assert losses[-1] < 0.5 * losses[0]
    assert out["cls/accuracy"].item() == 1.0
    assert model(images).shape == (len(crops), 2)  # no labels: the logits


def test_image_pretrain_config_builds_the_supervised_pieces():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=["stage=image_pretrain", "stage.method=supervised"])
    source = _Detections()
    crops = instantiate(cfg.stage.supervised.crops, source=source)
    assert crops[0][0].shape[-1] == cfg.stage.supervised.crops.crop_size
    encoder = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    model = instantiate(cfg.stage.supervised.model, encoder=encoder, num_classes=crops.num_classes, feature_dim=8)
    assert model.classifier.out_features == 2
