"""Run and sweep directories, and sweeps that survive a failing job.

Imported by run.py (and, through the SweepFailures callback, by every launcher's job process) so that its two
OmegaConf resolvers exist before Hydra resolves `hydra.run.dir`, `hydra.sweep.dir` and `hydra.sweep.subdir`:

- `${run_id:<strftime pattern>,<suffix digits>}`: the start time, then `_` and random hex digits, so two runs
  started in the same second get different directories. One value per process; under torchrun (or Slurm tasks
  that submitit describes) every rank takes the first rank's value. `DETPIPE_RUN_ID=<name>` pins it.
- `${overrides_hash:<override_dirname>,<digits>}`: a short stable hash of a job's overrides, so a sweep job's
  directory name changes with its values and a re-run with a changed value list never pairs old results with new
  overrides.

In a multirun, `run_job` records a job's failure as `<job_dir>/error.json` and lets the sweep go on;
`SweepFailures.on_multirun_end` lists the failed jobs and run.py then exits non-zero.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from stages.engine.files import atomic_write_text
from stages.errors import UserError, one_line

log = logging.getLogger("detpipe")

ERROR_FILE = "error.json"
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
RUN_ID_ENV = "DETPIPE_RUN_ID"
# Random bytes drawn per run; `${run_id:...,N}` shows the first N hex digits of them.
_TOKEN_BYTES = 16
_STORE_KEY = "detpipe/run_start"
# A job directory's name: Hydra's job number, then `_<hash>` (or nothing, for sweeps made before the hash).
_JOB_NAME = re.compile(r"(\d+)(?:_.*)?")

_run_start: tuple[float, str] | None = None
# Rank 0's store server when no torchrun agent hosts one; kept alive so init_process_group reuses it (multi-tenant).
_store_server = None
_failed_jobs: list[dict] = []


# --- run directories -------------------------------------------------------------------------------------------


def run_id(pattern: str, suffix_digits: int) -> str:
    """`<start time formatted by pattern>_<suffix_digits random hex digits>`, the same on every rank; or the value
    of DETPIPE_RUN_ID when set."""
    pinned = os.environ.get(RUN_ID_ENV, "").strip()
    if pinned:
        return pinned
    suffix_digits = int(suffix_digits)
    if not 0 < suffix_digits <= 2 * _TOKEN_BYTES:
        raise ValueError(f"run_id: suffix digits {suffix_digits}; expected 1..{2 * _TOKEN_BYTES}")
    seconds, token = _shared_run_start()
    return f"{datetime.fromtimestamp(seconds).strftime(pattern)}_{token[:suffix_digits]}"


def _shared_run_start() -> tuple[float, str]:
    """(start time, random hex token), chosen once per process: Hydra may resolve `${run_id:...}` several times
    and from several config objects, and each must give the same directory."""
    global _run_start
    if _run_start is None:
        mine = f"{time.time()!r} {secrets.token_hex(_TOKEN_BYTES)}"
        seconds, token = _share_across_ranks(mine).split()
        _run_start = (float(seconds), token)
    return _run_start


def _share_across_ranks(value: str) -> str:
    """`value` of whichever rank of this launch gets there first (every rank gets the same), or `value` itself
    in a single process. The exchange runs before the process group exists, through a TCPStore at
    MASTER_ADDR:MASTER_PORT: torchrun's agent hosts one there before it starts the workers
    (TORCHELASTIC_USE_AGENT_STORE=True); otherwise rank 0 starts it, multi-tenant, so that init_process_group
    later reuses the same server."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return value
    import torch.distributed as dist

    from stages.engine.distributed import export_slurm_environment

    # Slurm tasks launched without torchrun get their RANK / MASTER_* here, as the stage itself would later.
    export_slurm_environment()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return value
    if not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
        raise ValueError(
            f"run_id: WORLD_SIZE={os.environ['WORLD_SIZE']} without MASTER_ADDR/MASTER_PORT, so the ranks cannot agree "
            f"on one run directory; expected {RUN_ID_ENV}=<name> (the same for every rank) or hydra.run.dir=<dir>"
        )
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    # Keyed by the launch, so that an elastic restart of the same torchrun keeps its directory.
    key = f"{_STORE_KEY}/{os.environ.get('TORCHELASTIC_RUN_ID', '')}"
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True):
        store = dist.TCPStore(host, port, is_master=False)
        return store.compare_set(key, "", value).decode()
    global _store_server
    if int(os.environ.get("RANK", "0")) == 0:
        _store_server = dist.TCPStore(host, port, is_master=True, wait_for_workers=False, multi_tenant=True)
        _store_server.set(key, value)
        return value
    # Waits (TCPStore's default timeout) for rank 0 to start the server and set the key.
    return dist.TCPStore(host, port, is_master=False).get(key).decode()


# --- sweep job names -------------------------------------------------------------------------------------------


def overrides_hash(override_dirname: str, digits: int) -> str:
    """The first `digits` hex digits of sha256 of a job's `hydra.job.override_dirname` (its sorted overrides)."""
    return hashlib.sha256(str(override_dirname).encode("utf-8")).hexdigest()[: int(digits)]


def job_number(name: str) -> int | None:
    """Hydra's job number of a sweep job directory named `<num>` or `<num>_<hash>`; None for other names."""
    match = _JOB_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def job_sort_key(path: Path) -> tuple:
    """Job directories in job-number order, other names after them by name."""
    number = job_number(path.name)
    return (number is None, number if number is not None else 0, path.name)


def register_resolvers() -> None:
    # use_cache: the value travels with the pickled config (joblib, submitit), so every job of a sweep sees the
    # sweep directory the launching process chose.
    OmegaConf.register_new_resolver("run_id", run_id, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("overrides_hash", overrides_hash, replace=True)


register_resolvers()


# --- sweep jobs that fail --------------------------------------------------------------------------------------


def in_multirun() -> bool:
    """Whether this process runs a job of a Hydra multirun (`python run.py -m ...`)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_job(cfg: DictConfig, task: Callable[[DictConfig], Any]) -> Any:
    """`task(cfg)` for one job of a multirun. A failure is written to `<job_dir>/error.json` (one-line message,
    exception type, the job's overrides) and the job returns None, so the launcher goes on with the next jobs."""
    hydra_cfg = HydraConfig.get()
    error_path = Path(hydra_cfg.runtime.output_dir) / ERROR_FILE
    # A re-run of the sweep into the same directory: the job's earlier failure no longer describes it.
    error_path.unlink(missing_ok=True)
    try:
        return task(cfg)
    except Exception as err:
        if isinstance(err, UserError):
            message = one_line(err)
            log.error("error: %s", message)
        else:
            message = f"{type(err).__name__}: {one_line(err)}"
            log.error("job failed with %s", type(err).__name__, exc_info=err)
        record = {"error": message, "type": type(err).__name__, "overrides": list(hydra_cfg.overrides.task)}
        atomic_write_text(error_path, json.dumps(record, indent=2) + "\n")
        return None


def read_error(job_dir: Path) -> dict | None:
    """A job's error.json as {"error", "type", "overrides"}; None when the job did not fail."""
    path = Path(job_dir) / ERROR_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err}); expected the job's error record") from err
    if not isinstance(record, dict):
        raise UserError(f"{path}: expected a JSON object with 'error', 'type' and 'overrides'")
    return record


def failed_jobs() -> list[dict]:
    """The failed jobs of the multirun this process launched ({"job", "error", "overrides"}), in job order;
    filled by SweepFailures at the end of the sweep."""
    return list(_failed_jobs)


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def _snapshot(sweep_dir: Path) -> dict[Path, tuple[int, int]]:
    """Identity of every job's error.json and overrides.yaml: files this sweep writes differ from it afterwards."""
    if not sweep_dir.is_dir():
        return {}
    files = [*sweep_dir.glob(f"*/{ERROR_FILE}"), *sweep_dir.glob(f"*/{OVERRIDES_FILE}")]
    return {path: _stamp(path) for path in files if path.is_file()}


class SweepFailures(Callback):
    """Lists the jobs of a multirun that failed, read from their error.json (launchers may run jobs in other
    processes or on other machines, so the files are the one record all of them share). Only files this sweep
    wrote count: failures left in the sweep directory by an earlier sweep are not this one's."""

    def __init__(self) -> None:
        self._before: dict[Path, tuple[int, int]] = {}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _failed_jobs.clear()
        self._before = _snapshot(Path(str(config.hydra.sweep.dir)))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        written = [path for path, stamp in _snapshot(sweep_dir).items() if self._before.get(path) != stamp]
        ran = {path.parents[1] for path in written if path.name == OVERRIDES_FILE.name}
        failed = sorted((path.parent for path in written if path.name == ERROR_FILE), key=job_sort_key)
        for job_dir in failed:
            record = read_error(job_dir) or {}
            overrides = record.get("overrides") or []
            _failed_jobs.append({"job": job_dir.name, "error": record.get("error", ""), "overrides": overrides})
            print(f"error: job {job_dir.name} ({' '.join(overrides)}): {record.get('error', '')}", file=sys.stderr)
        if failed:
            print(
                f"error: {len(failed)} of {len(ran | set(failed))} jobs failed (sweep directory {sweep_dir})",
                file=sys.stderr,
            )
