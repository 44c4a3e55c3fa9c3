"""Files written so that a kill never leaves them half-written, keyed JSON caches read back only when they match,
and a lock for work only one process may do."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger("detpipe")

# Atomic writes go to ".<name>.<random>.tmp" beside the target; a killed run can leave one behind.
TEMP_SUFFIX = ".tmp"


def atomic_write_bytes(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call `write(file_object)` on a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    # mkstemp makes the file private (0600); results are meant to be read by others too.
    os.fchmod(fd, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")))


def read_keyed_cache(path: Path, key: str, image_ids: list, field: str, what: str) -> Any | None:
    """`payload[field]` of the JSON cache at `path` if it was written for exactly this key and these image ids,
    else None: missing, unreadable (logged) or stale (logged; `what` names the cache in the log)."""
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text())
        stored_key, stored_ids, value = payload["key"], payload["image_ids"], payload[field]
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("%s: cache %s is unreadable (%s); rebuilding it", what, path, err)
        return None
    if stored_key != key or stored_ids != image_ids:
        log.warning("%s: cache %s does not match these images and parameters; rebuilding it", what, path)
        return None
    return value


@contextlib.contextmanager
def file_lock(path: Path, waiting: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if needed) for the `with` block; other processes asking for it
    wait. `waiting` is logged once when the lock is taken by someone else."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                log.info("%s", waiting)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
