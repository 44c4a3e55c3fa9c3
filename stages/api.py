"""Use a trained detector from Python:

    from stages.api import load_detector

    detector = load_detector("outputs/2026-11-29/10-00-00_ab12/finetune")  # run dir, stage dir or checkpoint
    detections = detector("street.jpg")  # or an HxWx3 uint8 RGB array, or a list of either
    for box, score, name in zip(detections.boxes, detections.scores, detections.names):
        ...

The checkpoint carries what inference needs: the model config, the category ids and names its class head
predicts, and the validation resize. Boxes come back as xyxy in the pixels of the image passed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from stages.build import build_model
from stages.data.transforms import build_transforms
from stages.engine.checkpoint import CATEGORIES_KEY, load_state_into, read_checkpoint, resolve_checkpoint
from stages.errors import UserError

ImageInput = str | Path | np.ndarray


@dataclass
class Detections:
    """One image's detections above the detector's score threshold, highest score first.

    boxes: [N, 4] float xyxy in the input image's pixels; scores: [N]; labels: [N] contiguous class indices;
    category_ids: the dataset's own ids; names: the class names."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    category_ids: list[int]
    names: list[str]

    def __len__(self) -> int:
        return len(self.scores)


def read_image(path: str | Path) -> np.ndarray:
    """An image file as HxWx3 uint8 RGB (grayscale and palette files become RGB); UserError if it cannot be
    decoded."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        problem = "cannot be decoded as an image" if Path(path).is_file() else "does not exist"
        raise UserError(f"{path}: {problem}; expected a JPEG or PNG file")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def as_rgb(image: ImageInput) -> np.ndarray:
    """A path or an array as HxWx3 uint8 RGB (an HxW grayscale array is repeated to three channels)."""
    if isinstance(image, str | Path):
        return read_image(image)
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise UserError(f"image array of shape {array.shape}; expected HxWx3 RGB or HxW grayscale")
    if array.dtype != np.uint8:
        raise UserError(f"image array of dtype {array.dtype}; expected uint8 (0-255)")
    return array


class Detector:
    """A trained detector for inference: `detector(image)` -> Detections, `detector([images])` -> a list."""

    def __init__(
        self,
        model: torch.nn.Module,
        categories: list[dict],
        transforms,
        score_threshold: float,
        device: torch.device,
        batch_size: int,
        config: DictConfig | None = None,
    ):
        self.model = model.to(device).eval()
        # The resolved config the checkpoint was trained with (model, data transforms...).
        self.config = config
        self.categories = categories
        self.transforms = transforms
        self.score_threshold = float(score_threshold)
        self.device = device
        self.batch_size = int(batch_size)

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.categories]

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> Detections | list[Detections]:
        if isinstance(images, str | Path | np.ndarray):
            return self.predict([images])[0]
        return self.predict(list(images))

    @torch.no_grad()
    def predict(self, images: Sequence[ImageInput]) -> list[Detections]:
        """Detections for each image, `batch_size` images per forward pass."""
        detections = []
        for start in range(0, len(images), self.batch_size):
            batch = [as_rgb(image) for image in images[start : start + self.batch_size]]
            inputs, scales = [], []
            for rgb in batch:
                tensor = torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255)
                height, width = rgb.shape[:2]
                empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
                resized, _ = self.transforms(tensor, empty)
                inputs.append(resized.to(self.device))
                scales.append((width / resized.shape[2], height / resized.shape[1]))
            outputs = self.model(inputs)
            detections += [self._detections(output, scale) for output, scale in zip(outputs, scales, strict=True)]
        return detections

    def _detections(self, output: dict[str, torch.Tensor], scale: tuple[float, float]) -> Detections:
        keep = output["scores"] >= self.score_threshold
        order = output["scores"][keep].argsort(descending=True)
        boxes = output["boxes"][keep][order].float().cpu().numpy().copy()
        boxes[:, 0::2] *= scale[0]
        boxes[:, 1::2] *= scale[1]
        labels = output["labels"][keep][order].cpu().numpy()
        return Detections(
            boxes=boxes,
            scores=output["scores"][keep][order].float().cpu().numpy(),
            labels=labels,
            category_ids=[int(self.categories[i]["id"]) for i in labels],
            names=[str(self.categories[i]["name"]) for i in labels],
        )


def load_detector(path: str | Path, device: str = "cpu", score_threshold: float = 0.0, batch_size: int = 1) -> Detector:
    """The detector of a fine-tuned checkpoint (a file, a stage directory, or a run directory: its latest training
    stage), built from the config stored in it, as the plain DETR for a Co-DETR checkpoint."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r}: torch sees no CUDA device here; expected device='cpu'")
    checkpoint = resolve_checkpoint(path)
    payload = read_checkpoint(checkpoint)
    categories = payload.get(CATEGORIES_KEY)
    if not categories:
        raise UserError(
            f"{checkpoint}: records no category names (a {payload.get('stage', 'foreign')} checkpoint); expected a "
            "finetune checkpoint, whose class head was trained on named categories"
        )
    config = OmegaConf.create(payload.get("config") or {})
    if "model" not in config or "data" not in config:
        raise UserError(f"{checkpoint}: records no model and data config; expected a checkpoint of this pipeline")
    model = build_model(config.model, len(categories), num_aux_heads=0)
    report = load_state_into(model, payload["model"], str(checkpoint))
    if report.num_loaded == 0:
        raise UserError(f"{checkpoint}: none of its tensors fit the model its config describes")
    transforms = build_transforms(config.data.transforms, train=False)
    return Detector(model, categories, transforms, score_threshold, torch.device(device), batch_size, config)
