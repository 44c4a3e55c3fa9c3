"""Pictures of predictions: true boxes in green, predicted boxes in red with class and score."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch


def draw_detections(
    image: torch.Tensor,
    true_boxes: torch.Tensor,
    pred: dict[str, torch.Tensor],
    class_names: list[str],
    score_threshold: float,
) -> np.ndarray:
    """An HxWx3 uint8 RGB picture of `image` (CHW in [0, 1]) with its true and predicted boxes."""
    canvas = np.ascontiguousarray((image.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8))
    for box in true_boxes.tolist():
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        cv2.rectangle(canvas, (x0, y0), (x1, y1), (0, 200, 0), 1)
    keep = pred["scores"] >= score_threshold
    for box, label, score in zip(
        pred["boxes"][keep].tolist(),
        pred["labels"][keep].tolist(),
        pred["scores"][keep].tolist(),
        strict=True,
    ):
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        cv2.rectangle(canvas, (x0, y0), (x1, y1), (220, 30, 30), 1)
        cv2.putText(
            canvas,
            f"{class_names[label]} {score:.2f}",
            (x0, max(8, y0 - 2)),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.3,
            (220, 30, 30),
            1,
            cv2.LINE_AA,
        )
    return canvas


def save_png(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    cv2.imwrite(str(tmp), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    tmp.replace(path)
