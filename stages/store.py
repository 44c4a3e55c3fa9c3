"""The stage store: finished training stages kept by fingerprint, `<paths.store_dir>/<stage>/<fingerprint>/`.

A pipeline (or a sweep job's pipeline) computes a training stage into its store entry and links the entry into
its run directory; a later run, or another job, whose stage has the same fingerprint finds the entry finished and
reuses it. An entry is computed under a lock (`<entry>.lock`), so jobs that need the same stage at the same time
compute it once: the others wait, then reuse it. A killed computation resumes from the entry's last.pth. A changed
fingerprint names another entry: nothing is overwritten, and the old entry stays.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import AbstractContextManager
from pathlib import Path

from stages.common import read_summary
from stages.engine.checkpoint import CHECKPOINT_NAME
from stages.engine.files import file_lock
from stages.fingerprint import Fingerprint, read_fingerprint

log = logging.getLogger("detpipe")
# Training stages: expensive and deterministic given their fingerprint, so kept and shared. eval is cheap and is
# recomputed in the run directory.
STORED_STAGES = ("image_pretrain", "box_pretrain", "finetune")


def entry_dir(store_dir: str | Path, fingerprint: Fingerprint) -> Path:
    return Path(store_dir) / fingerprint.stage / fingerprint.short


def entry_lock(entry: Path) -> AbstractContextManager[None]:
    """The lock held while the entry is checked and, if unfinished, computed."""
    waiting = f"[store] {entry.parent.name} {entry.name}: another job is computing it; waiting to reuse it"
    return file_lock(entry.with_name(f"{entry.name}.lock"), waiting=waiting)


def is_finished(entry: Path, fingerprint: Fingerprint) -> bool:
    """Whether `entry` holds a finished run with this exact fingerprint (the full hash, not the short name)."""
    recorded = read_fingerprint(entry)
    return (
        recorded is not None
        and recorded.digest == fingerprint.digest
        and read_summary(entry) is not None
        and (entry / CHECKPOINT_NAME).is_file()
    )


def link_into_run(run_dir: Path, name: str, target: Path) -> Path:
    """<run_dir>/<name> becomes a relative symbolic link to `target`, so the run directory shows every stage it
    used and survives moving the output folder as a whole. A real directory already there (an older layout) is
    moved aside, not deleted."""
    link = Path(run_dir) / name
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        aside = link.with_name(f"{name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        log.warning("[store] %s is a directory; moved to %s to link the stored stage in its place", link, aside)
        link.rename(aside)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(Path(target).resolve(), link.parent.resolve()), target_is_directory=True)
    return link
