"""predict: a trained detector on new images: `<stage dir>/predictions.json` and pictures of the first few.

    python run.py stage=predict stage.init_from=<run dir | stage dir | checkpoint> stage.input=<image | folder | glob>

Images are read in sorted order, `stage.batch_size` at a time, through the Python API (stages/api.py). A file that
cannot be decoded is skipped with a warning and listed in summary.json; it does not stop the run.
"""

from __future__ import annotations

import glob
import json
import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from stages.api import Detections, load_detector, read_image
from stages.context import open_stage
from stages.engine.files import atomic_write_text
from stages.engine.visualize import draw_detections, save_png
from stages.errors import UserError

log = logging.getLogger("detpipe")
# Files a folder or glob contributes (lower-cased suffixes).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def find_images(spec: str) -> tuple[list[Path], Path]:
    """(image files, the folder their names are relative to) for an image path, a folder (searched recursively)
    or a glob pattern; UserError when nothing matches."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path], path.parent
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"stage.input: {path} holds no {'/'.join(IMAGE_SUFFIXES)} file; expected images")
        return files, path
    matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if not matches:
        raise UserError(f"stage.input: {spec} is no file, folder or glob matching files; expected images")
    # Names relative to the pattern's leading folders, those before the first wildcard.
    prefix = []
    for part in path.parts[:-1]:
        if any(char in part for char in "*?["):
            break
        prefix.append(part)
    return matches, Path(*prefix) if prefix else Path(".")


def detection_records(name: str, detections: Detections) -> list[dict]:
    """COCO-style records ([x, y, w, h] in the image's pixels) of one image's detections."""
    return [
        {
            "file_name": name,
            "category_id": category_id,
            "category_name": category_name,
            "bbox": [round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)],
            "score": round(float(score), 5),
        }
        for (x0, y0, x1, y1), score, category_id, category_name in zip(
            detections.boxes.tolist(), detections.scores, detections.category_ids, detections.names, strict=True
        )
    ]


def run(cfg: DictConfig) -> dict:
    ctx = open_stage(cfg)
    if not cfg.stage.init_from:
        raise UserError("stage.init_from: not set; expected a run directory, stage directory or checkpoint")
    if not cfg.stage.input:
        raise UserError("stage.input: not set; expected an image, a folder of images or a glob pattern")
    detector = load_detector(
        cfg.stage.init_from,
        device=str(ctx.device),
        score_threshold=cfg.stage.score_threshold,
        batch_size=cfg.stage.batch_size,
    )
    files, root = find_images(str(cfg.stage.input))
    records: list[dict] = []
    skipped: list[dict] = []
    shown = 0
    batch_size = int(cfg.stage.batch_size)
    for start in tqdm(range(0, len(files), batch_size), desc="predict", unit="batch"):
        names, images = [], []
        for path in files[start : start + batch_size]:
            name = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
            try:
                images.append(read_image(path))
                names.append(name)
            except UserError as err:
                log.warning("predict: skipping %s (%s)", path, err)
                skipped.append({"file_name": name, "error": str(err)})
        if not images:
            continue
        for name, image, detections in zip(names, images, detector.predict(images), strict=True):
            records += detection_records(name, detections)
            if shown < cfg.stage.num_vis:
                save_picture(
                    ctx.out / "vis" / f"{name.replace('/', '__').rsplit('.', 1)[0]}.png",
                    image,
                    detections,
                    detector.class_names,
                )
                shown += 1
    atomic_write_text(ctx.out / "predictions.json", json.dumps(records))
    log.info("predict: %d detections on %d images into %s", len(records), len(files) - len(skipped), ctx.out)
    return ctx.write_summary(
        {
            "checkpoint": None,
            "source": str(cfg.stage.init_from),
            "metrics": {"num_images": len(files) - len(skipped), "num_detections": len(records)},
            "num_skipped": len(skipped),
            "skipped": skipped,
        }
    )


def save_picture(path: Path, image: np.ndarray, detections: Detections, class_names: list[str]) -> None:
    """The image with its detections drawn and named."""
    chw = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    pred = {
        "boxes": torch.as_tensor(detections.boxes).reshape(-1, 4),
        "scores": torch.as_tensor(detections.scores),
        "labels": torch.as_tensor(detections.labels, dtype=torch.int64),
    }
    save_png(path, draw_detections(chw, torch.zeros(0, 4), pred, class_names, score_threshold=0.0))
