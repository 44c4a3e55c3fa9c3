"""A trained detector as the graph a deployment runs (what `stage=export` writes to ONNX)."""

from __future__ import annotations

from torch import Tensor, nn


class DeployedDetector(nn.Module):
    """images float32 [N, 3, H, W], RGB values 0-255 -> (scores [N, D], labels int64 [N, D] contiguous class
    indices, boxes [N, D, 4] xyxy in input pixels). The preprocessing (scaling to [0, 1], normalisation, padding)
    is inside; the detector provides `predict_batch(images in [0, 1])`. A Co-DETR runs as its plain DETR."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.detector.predict_batch(images / 255.0)
