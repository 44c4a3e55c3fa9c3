"""An exported detector (model.onnx + model.json, written by stage=export) run with ONNX Runtime behind the same
call as the PyTorch model at inference: `model(images)` -> one {"boxes", "scores", "labels"} per image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from stages.errors import UserError

# model.json's "format": a file without it was not written by stage=export.
ONNX_FORMAT = "detpipe-onnx-detector"
METADATA_KEY = "detpipe"


def read_model_json(onnx_path: Path) -> dict:
    """The model.json beside `onnx_path`; UserError when it is missing or not one of ours."""
    path = Path(onnx_path).with_name("model.json")
    if not Path(onnx_path).is_file():
        raise UserError(f"{onnx_path}: file not found; expected the model.onnx written by stage=export")
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: not found beside {onnx_path}; expected the model.json stage=export writes") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg}); expected the model.json stage=export writes") from None
    if not isinstance(info, dict) or info.get("format") != ONNX_FORMAT:
        raise UserError(f"{path}: 'format' is not {ONNX_FORMAT!r}; expected a model exported by stage=export")
    return info


class OnnxDetector:
    """ONNX Runtime behind the eval loop's call: `model(images)` with CHW float images in [0, 1] of any size, one
    result per image in its own pixels. A graph with a fixed input size gets each image pasted into its top-left
    corner on a background of the normalisation mean (which the graph's normalisation turns into zeros, as a
    padded batch has), and keeps the detections inside the image."""

    def __init__(self, onnx_path: str | Path, threads: int | None = None):
        import onnx
        import onnxruntime

        self.path = Path(onnx_path)
        self.info = read_model_json(self.path)
        model = onnx.load(str(self.path), load_external_data=False)
        if not any(p.key == METADATA_KEY for p in model.metadata_props):
            raise UserError(
                f"{self.path}: carries no {METADATA_KEY!r} metadata; expected a model exported by stage=export"
            )
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.categories = self.info["categories"]
        self.fixed_size = None if self.info["input"]["dynamic_size"] else tuple(self.info["input"]["size"])
        self.pad_value = np.asarray(self.info["preprocessing"]["mean"], dtype=np.float32)[:, None, None] * 255

    # The eval loop moves and switches models; an ONNX session has nothing to move.
    def to(self, device: torch.device) -> OnnxDetector:
        return self

    def eval(self) -> OnnxDetector:
        return self

    def __call__(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        return [self._one(image) for image in images]

    def _one(self, image: Tensor) -> dict[str, Tensor]:
        pixels = image.detach().cpu().float().numpy() * 255
        height, width = pixels.shape[-2:]
        if self.fixed_size is not None:
            canvas = np.broadcast_to(self.pad_value, (3, *self.fixed_size)).copy()
            if height > self.fixed_size[0] or width > self.fixed_size[1]:
                raise UserError(
                    f"{self.path}: takes {self.fixed_size[0]}x{self.fixed_size[1]} images; got {height}x{width}; "
                    "expected images resized to fit (model.json 'input')"
                )
            canvas[:, :height, :width] = pixels
            pixels = canvas
        scores, labels, boxes = self.session.run(None, {"images": pixels[None].astype(np.float32)})
        scores, labels, boxes = torch.from_numpy(scores[0]), torch.from_numpy(labels[0]), torch.from_numpy(boxes[0])
        if self.fixed_size is not None:
            inside = (boxes[:, 0] < width) & (boxes[:, 1] < height) & (scores > 0)
            scores, labels, boxes = scores[inside], labels[inside], boxes[inside]
            boxes[:, 0::2] = boxes[:, 0::2].clamp(max=width)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(max=height)
        return {"boxes": boxes, "scores": scores, "labels": labels}
