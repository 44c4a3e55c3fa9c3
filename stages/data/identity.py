"""What a stage's input data is, for its fingerprint: annotation files by content hash, image folders by their
file list and sizes (hashing every image would cost as much as reading the dataset once more).

Hashes are cached per process by (path, size, mtime), so the stages of one pipeline hash a file once.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from omegaconf import DictConfig

from stages.data.synthetic import ensure_synthetic
from stages.errors import UserError

_file_hashes: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes (cached while the file's size and mtime stay the same)."""
    path = Path(path)
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _file_hashes:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _file_hashes[key] = digest.hexdigest()
    return _file_hashes[key]


def folder_listing(folder: Path) -> dict:
    """A folder's files (recursively) by relative path and size: their count and a sha256 of the sorted listing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: is not a folder; expected the images folder")
    digest = hashlib.sha256()
    count = 0
    for directory, subdirs, files in os.walk(folder):
        subdirs.sort()
        for name in sorted(files):
            path = Path(directory) / name
            digest.update(f"{path.relative_to(folder).as_posix()}\t{path.stat().st_size}\n".encode())
            count += 1
    return {"num_files": count, "listing_sha256": digest.hexdigest()}


def data_identity(data_cfg: DictConfig, split: str) -> dict:
    """The identity of one split of the dataset `data_cfg` names: its annotation files' sha256 and its image
    folder's listing. The synthetic dataset is generated first if needed (its files are hashed like user data)."""
    root = Path(str(data_cfg.root))
    if data_cfg.name == "voc":
        return _voc_identity(root, data_cfg[f"{split}_sets"])
    if data_cfg.name == "synthetic":
        ensure_synthetic(data_cfg)
    return {
        "annotations": file_sha256(root / str(data_cfg[f"{split}_json"])),
        "images": folder_listing(root / str(data_cfg[f"{split}_images"])),
    }


def _voc_identity(root: Path, image_sets) -> dict:
    """VOC: each image-set file and every annotation XML by content, the image folders by listing."""
    identity = {}
    for year, name in image_sets:
        year_dir = root / f"VOC{year}"
        identity[f"VOC{year}/{name}"] = {
            "image_set": file_sha256(year_dir / "ImageSets" / "Main" / f"{name}.txt"),
            "annotations": _folder_content(year_dir / "Annotations"),
            "images": folder_listing(year_dir / "JPEGImages"),
        }
    return identity


def _folder_content(folder: Path) -> str:
    """One sha256 over every file's relative path and content (for folders of small annotation files)."""
    if not folder.is_dir():
        raise UserError(f"{folder}: is not a folder; expected the VOC annotations")
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder).as_posix()}\t{file_sha256(path)}\n".encode())
    return digest.hexdigest()
