"""A stage's fingerprint: one hash of everything that can change what the stage writes.

It covers the stage's resolved config, the identity of the checkpoint it starts from (that stage's fingerprint, or
the file's sha256), its input data (annotation files by content, image folders by file list and sizes), the number
of processes, the library versions and the project's own source. It leaves out only what provably cannot change
the output: where things are written, logging, progress cadence, and per stage the keys that stage never reads
(`not_read`). A key wrongly left out would let a stale result pass as current; one wrongly kept only costs a
recomputation, so anything doubtful stays in.

`fingerprint.json` in a stage directory holds the hash and every part that went into it, so two fingerprints can
say which keys differ.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from omegaconf import DictConfig, OmegaConf

from stages.data.identity import data_identity, file_sha256, folder_listing
from stages.engine.checkpoint import checkpoint_identity
from stages.engine.distributed import world_size

# Bump when what goes into a fingerprint changes, so that stored stages made under the old rule are not reused.
FORMAT = 1
FINGERPRINT_FILE = "fingerprint.json"
# The stages that have a fingerprint (pipeline and report only gather others' results).
FINGERPRINTED = ("image_pretrain", "box_pretrain", "finetune", "eval")
# Config keys (and everything under them) no stage's output depends on: output places, logging, progress
# cadence, and the init checkpoint's path (its identity is an input instead). The proposal cache's place and
# workers do not change the boxes (stages/data/proposals.py keys its cache without them).
NEVER_READ = (
    "paths",
    "logger",
    "trainer.log_every",
    "trainer.checkpoint_every",
    "stage.init_from",
    "stage.proposals.cache_dir",
    "stage.proposals.num_workers",
    "stage.proposals.start_method",
)
TRAIN_DATA = (
    "data.fraction",
    "data.subset_seed",
    "data.limit_train_images",
    "data.train_images",
    "data.train_json",
    "data.train_sets",
    "data.transforms.train",
)
VAL_DATA = ("data.limit_val_images", "data.val_images", "data.val_json", "data.val_sets", "data.transforms.val")
# Trainer keys the eval stage never reads (it only infers).
TRAINING_ONLY = (
    "trainer.max_iters",
    "trainer.epochs",
    "trainer.batch_size",
    "trainer.optimizer",
    "trainer.scheduler",
    "trainer.clip_grad_norm",
)
# The source the stages run: a change to it can change any output.
SOURCE_PACKAGES = ("models", "stages")
_source_digest: str | None = None


def label_free(cfg: DictConfig) -> bool:
    """Whether the stage reads no labels, so that `data.fraction` (the labelled fraction) and its `subset_seed` are
    not its input: box pre-training, and image pre-training other than classifying the detection set's ground-truth
    crops."""
    if cfg.stage.name == "box_pretrain":
        return True
    return cfg.stage.name == "image_pretrain" and not (
        cfg.stage.method == "supervised" and not cfg.stage.supervised.image_folder
    )


def not_read(cfg: DictConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(left-out key prefixes, kept prefixes that win over them) for the stage `cfg.stage.name`."""
    name = cfg.stage.name
    dropped: list[str] = list(NEVER_READ)
    kept: list[str] = []
    if name == "image_pretrain":
        # It builds model.detector.backbone alone; its datasets read raw images, not the detection transforms.
        dropped += ["model", *VAL_DATA, "data.transforms"]
        kept += ["model.detector.backbone"]
        if cfg.stage.method == "import" or cfg.stage.supervised.image_folder:
            dropped.append("data")
    elif name == "box_pretrain":
        # The two views carry their own (resolved) sizes in stage.views.
        dropped += [*VAL_DATA, "data.transforms"]
    elif name == "finetune":
        # Its optional evaluation writes <run_dir>/eval, not the checkpoint.
        dropped += [*VAL_DATA, "stage.evaluate"]
    elif name == "eval":
        # Inference is the plain DETR, whatever K the checkpoint was trained with.
        dropped += [*TRAIN_DATA, *TRAINING_ONLY, "model.num_aux_heads", "model.aux_heads", "model.aux_head_configs"]
    if label_free(cfg):
        dropped += ["data.fraction", "data.subset_seed"]
    return tuple(dropped), tuple(kept)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: leaf value} of nested dicts; lists are leaves."""
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        if not node and prefix:
            flat[prefix[:-1]] = {}
        return flat
    return {prefix[:-1]: node}


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def config_part(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config of the stage, flattened, without the keys its output cannot depend on."""
    dropped, kept = not_read(cfg)
    flat = flatten(OmegaConf.to_container(cfg, resolve=True))
    return {k: v for k, v in sorted(flat.items()) if _under(k, kept) or not _under(k, dropped)}


def init_source(cfg: DictConfig) -> str | None:
    """The checkpoint the stage starts from: `stage.init_from`, or for eval its default, <run_dir>/finetune."""
    source = cfg.stage.get("init_from")
    if source is None and cfg.stage.name == "eval":
        source = str(Path(str(cfg.paths.run_dir)) / "finetune")
    return str(source) if source else None


def source_digest() -> str:
    """One sha256 over the project's Python source (models/, stages/)."""
    global _source_digest
    if _source_digest is None:
        root = Path(__file__).resolve().parent.parent
        digest = hashlib.sha256()
        for package in SOURCE_PACKAGES:
            for path in sorted((root / package).rglob("*.py")):
                digest.update(f"{path.relative_to(root).as_posix()}\t{file_sha256(path)}\n".encode())
        _source_digest = digest.hexdigest()
    return _source_digest


def inputs_part(cfg: DictConfig) -> dict[str, Any]:
    """Everything the stage reads besides its config: init checkpoint, weights file, data, processes, code."""
    name = cfg.stage.name
    inputs: dict[str, Any] = {
        "world_size": world_size(),
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__},
        "source": source_digest(),
    }
    source = init_source(cfg)
    if source is not None:
        inputs["init"] = checkpoint_identity(source)
    if name == "image_pretrain" and cfg.stage.method == "import":
        inputs["weights"] = file_sha256(Path(str(cfg.stage.weights))) if cfg.stage.weights else None
    elif name == "image_pretrain" and cfg.stage.supervised.image_folder:
        inputs["image_folder"] = folder_listing(Path(str(cfg.stage.supervised.image_folder)))
    elif name == "eval":
        inputs["data"] = {"val": data_identity(cfg.data, "val")}
    else:
        inputs["data"] = {"train": data_identity(cfg.data, "train")}
    return inputs


@dataclass(frozen=True)
class Fingerprint:
    """A stage's identity: `digest` hashes `config` (flattened, resolved) and `inputs`."""

    stage: str
    digest: str
    config: dict[str, Any]
    inputs: dict[str, Any]

    @property
    def short(self) -> str:
        """The first 16 hex digits: the stage's directory name in the store."""
        return self.digest[:16]

    def as_dict(self) -> dict:
        return {
            "stage": self.stage,
            "fingerprint": self.digest,
            "format": FORMAT,
            "config": self.config,
            "inputs": self.inputs,
        }

    @classmethod
    def from_dict(cls, record: dict) -> Fingerprint:
        return cls(record["stage"], record["fingerprint"], record.get("config", {}), record.get("inputs", {}))

    def differences(self, other: Fingerprint) -> list[str]:
        """The keys (config keys, or `inputs.<part>`) whose values differ between the two fingerprints."""
        mine = {**self.config, **flatten(self.inputs, "inputs.")}
        theirs = {**other.config, **flatten(other.inputs, "inputs.")}
        return sorted(k for k in mine.keys() | theirs.keys() if mine.get(k, "<absent>") != theirs.get(k, "<absent>"))


def make_fingerprint(stage: str, config: dict[str, Any], inputs: dict[str, Any]) -> Fingerprint:
    canonical = json.dumps(
        {"format": FORMAT, "stage": stage, "config": config, "inputs": inputs}, sort_keys=True, default=str
    )
    return Fingerprint(stage, hashlib.sha256(canonical.encode()).hexdigest(), config, inputs)


def stage_fingerprint(cfg: DictConfig) -> Fingerprint:
    """The fingerprint of the stage `cfg` configures (`cfg.stage.name` in FINGERPRINTED)."""
    if cfg.stage.name not in FINGERPRINTED:
        raise ValueError(f"stage {cfg.stage.name!r} has no fingerprint; expected one of {FINGERPRINTED}")
    # A round trip through JSON makes the recorded parts compare equal to the ones read back from the file.
    config = json.loads(json.dumps(config_part(cfg), default=str))
    inputs = json.loads(json.dumps(inputs_part(cfg), default=str))
    return make_fingerprint(cfg.stage.name, config, inputs)


def read_fingerprint(stage_dir: Path) -> Fingerprint | None:
    """The fingerprint recorded in `stage_dir`, or None when there is none (or it is unreadable)."""
    path = Path(stage_dir) / FINGERPRINT_FILE
    try:
        return Fingerprint.from_dict(json.loads(path.read_text()))
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return None
