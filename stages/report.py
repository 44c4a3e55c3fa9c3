"""report: gather a Hydra multirun's per-job results into report.csv, report.md and report.png.

Reads the output contract (README, "Outputs") of every job directory in `cfg.stage.sweep_dir`:
`.hydra/overrides.yaml` (which values the job ran with), `eval/metrics.json` (COCO box AP) and
`<stage.train_stage>/summary.json` (training seconds) and `error.json` (a failed job's one-line error, written by
stages/sweep.py). A failed job is listed as failed with its error, a job without its metrics as unfinished.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from stages.common import stage_dir, write_json
from stages.engine.files import atomic_write_bytes
from stages.errors import UserError
from stages.sweep import job_sort_key, read_error

OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
METRICS_FILE = Path("eval") / "metrics.json"
METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
FINISHED, UNFINISHED, FAILED = "finished", "unfinished", "failed"
# Columns read_report_csv turns back into floats (None when empty).
NUMERIC_COLUMNS = (*METRIC_KEYS, "train_seconds")


@dataclass
class JobResult:
    """One job: its directory name, overrides, box metrics (None while unfinished), train seconds, and the
    one-line error of its last attempt (None unless it failed)."""

    name: str
    overrides: dict[str, str]
    metrics: dict[str, float] | None
    train_seconds: float | None
    error: str | None = None

    @property
    def status(self) -> str:
        # error.json is removed when a job starts again, so it describes the job's latest attempt.
        if self.error is not None:
            return FAILED
        return FINISHED if self.metrics is not None else UNFINISHED


def run(cfg: DictConfig) -> dict:
    """Write report.{csv,md,png} and summary.json into <run_dir>/report/; copy the reports to the sweep."""
    start = time.perf_counter()
    if OmegaConf.is_missing(cfg.stage, "sweep_dir") or not cfg.stage.sweep_dir:
        raise UserError(
            "stage.sweep_dir: not set; expected `stage.sweep_dir=<multirun dir holding 0_<hash>/, 1_<hash>/, ...>`"
        )
    sweep_dir = Path(str(cfg.stage.sweep_dir)).expanduser()
    jobs = [read_job(job_dir, cfg.stage.train_stage) for job_dir in find_job_dirs(sweep_dir)]
    keys = swept_keys(jobs)
    columns = ["job", *keys, *METRIC_KEYS, "train_seconds", "status", "error"]
    rows = [job_row(job, keys) for job in jobs]

    out = stage_dir(cfg, "report")
    table = markdown_table(rows, columns)
    reports = {
        "report.csv": csv_text(rows, columns).encode("utf-8"),
        "report.md": f"# Sweep report: {sweep_dir}\n\n{table}\n".encode(),
        "report.png": plot_png(jobs, keys, cfg.stage.plot_x, cfg.stage.log_x_min_ratio),
    }
    destinations = [out, sweep_dir] if cfg.stage.copy_to_sweep_dir else [out]
    for directory in destinations:
        for name, data in reports.items():
            atomic_write_bytes(directory / name, lambda f, data=data: f.write(data))

    finished = [job for job in jobs if job.status == FINISHED]
    failed = [job for job in jobs if job.status == FAILED]
    best = max(finished, key=lambda job: job.metrics["AP"], default=None)
    print(table)
    print(f"{len(finished)} of {len(jobs)} jobs finished, {len(failed)} failed; report written to {out}")
    for job in failed:
        print(f"failed: job {job.name}: {job.error}")
    summary = {
        "stage": "report",
        "checkpoint": None,
        "metrics": {
            "num_jobs": len(jobs),
            "num_finished": len(finished),
            "num_failed": len(failed),
            "best_AP": best.metrics["AP"] if best else None,
            "best_job": best.name if best else None,
        },
        "sweep_dir": str(sweep_dir),
        "swept_keys": keys,
        "unfinished_jobs": [job.name for job in jobs if job.status == UNFINISHED],
        "failed_jobs": [{"job": job.name, "error": job.error} for job in failed],
        "files": [str(directory / name) for directory in destinations for name in reports],
        "seconds": time.perf_counter() - start,
    }
    write_json(out / "summary.json", summary)
    return summary


def find_job_dirs(sweep_dir: Path) -> list[Path]:
    """The sweep's job directories (those holding .hydra/overrides.yaml), in job-number order."""
    if not sweep_dir.is_dir():
        raise UserError(f"{sweep_dir}: sweep directory does not exist; expected a Hydra multirun directory")
    job_dirs = [p for p in sweep_dir.iterdir() if p.is_dir() and (p / OVERRIDES_FILE).is_file()]
    if not job_dirs:
        hint = (
            " (it is a single run's directory; pass its multirun directory)"
            if (sweep_dir / OVERRIDES_FILE).is_file()
            else ""
        )
        raise UserError(
            f"{sweep_dir}: holds no job directory with {OVERRIDES_FILE}{hint}; expected 0_<hash>/, 1_<hash>/, ..."
        )
    # Jobs are named <num>_<hash> (<num> in older sweeps): numeric order, so job 10 comes after job 9.
    return sorted(job_dirs, key=job_sort_key)


def read_job(job_dir: Path, train_stage: str) -> JobResult:
    """A job's overrides, its box metrics (None when eval/metrics.json is absent), its train seconds and its
    error (None unless error.json is present)."""
    overrides = parse_overrides(job_dir / OVERRIDES_FILE)
    metrics_path = job_dir / METRICS_FILE
    metrics = None
    if metrics_path.is_file():
        bbox = _read_json(metrics_path).get("bbox")
        if not isinstance(bbox, dict) or any(key not in bbox for key in METRIC_KEYS):
            raise UserError(f"{metrics_path}: 'bbox' lacks some of {list(METRIC_KEYS)}; expected all of them")
        metrics = {key: float(bbox[key]) for key in METRIC_KEYS}
    summary_path = job_dir / train_stage / "summary.json"
    train_seconds = None
    if summary_path.is_file():
        summary = _read_json(summary_path)
        # The train loop's own time when the stage records it, else the stage's wall time.
        seconds = summary.get("train_seconds", summary.get("seconds"))
        train_seconds = float(seconds) if seconds is not None else None
    record = read_error(job_dir)
    error = str(record.get("error") or record.get("type") or "failed") if record is not None else None
    return JobResult(job_dir.name, overrides, metrics, train_seconds, error)


def parse_overrides(path: Path) -> dict[str, str]:
    """`key=value` strings of a Hydra overrides.yaml as {key: value}; `+`/`++` prefixes dropped."""
    try:
        items = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]}); expected a list of overrides") from err
    items = items or []
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise UserError(f"{path}: expected a YAML list of `key=value` strings")
    overrides = {}
    for item in items:
        key, _, value = item.partition("=")
        overrides[key.lstrip("+")] = value
    return overrides


def swept_keys(jobs: list[JobResult]) -> list[str]:
    """Override keys whose value differs between jobs, in first-seen order (absent counts as a value)."""
    keys = list(dict.fromkeys(key for job in jobs for key in job.overrides))
    return [key for key in keys if len({job.overrides.get(key) for job in jobs}) > 1]


def job_row(job: JobResult, keys: list[str]) -> dict:
    """One report row: job name, swept values, metrics (None if unfinished), train seconds, status, error."""
    row = {"job": job.name}
    row.update({key: job.overrides.get(key, "") for key in keys})
    row.update({key: job.metrics[key] if job.metrics else None for key in METRIC_KEYS})
    row["train_seconds"] = job.train_seconds
    row["status"] = job.status
    row["error"] = job.error
    return row


def csv_text(rows: list[dict], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    # None -> empty cell, so read_report_csv can tell missing from zero.
    writer.writerows({key: "" if row[key] is None else row[key] for key in columns} for row in rows)
    return buffer.getvalue()


def read_report_csv(path: str | Path) -> list[dict]:
    """Rows of a report.csv: AP columns and train_seconds as float (None when empty), others as strings."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in NUMERIC_COLUMNS:
            if key in row:
                row[key] = float(row[key]) if row[key] != "" else None
    return rows


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A GitHub markdown table; AP to 2 decimals, seconds to 1, missing values as '-', '|' escaped."""

    def cell(key: str, value) -> str:
        if value is None:
            return "-"
        if key in METRIC_KEYS:
            return f"{value:.2f}"
        if key == "train_seconds":
            return f"{value:.1f}"
        # An error message may hold a '|', which would end its cell.
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(key, row[key]) for key in columns) + " |" for row in rows]
    return "\n".join(lines)


def plot_png(jobs: list[JobResult], keys: list[str], plot_x: str, log_x_min_ratio: float) -> bytes:
    """PNG bytes of AP against `plot_x` (when swept with numeric values), one line per combination of the
    other swept keys; otherwise one bar per finished job."""
    # Figure + Agg canvas directly: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    finished = [job for job in jobs if job.status == FINISHED]
    x_values = [_as_float(job.overrides.get(plot_x)) for job in finished]
    if finished and plot_x in keys and all(x is not None for x in x_values):
        _plot_lines(ax, finished, x_values, [key for key in keys if key != plot_x], plot_x, log_x_min_ratio)
    else:
        _plot_bars(ax, finished, keys)
    ax.set_ylabel("box AP (%)")
    ax.grid(True, alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _plot_lines(ax, jobs: list[JobResult], xs: list[float], group_keys: list[str], plot_x: str, ratio: float):
    groups: dict[tuple, list[tuple[float, float]]] = {}
    for job, x in zip(jobs, xs):
        group = tuple(job.overrides.get(key, "") for key in group_keys)
        groups.setdefault(group, []).append((x, job.metrics["AP"]))
    for group in sorted(groups, key=lambda g: tuple(_sort_key(v) for v in g)):
        points = sorted(groups[group])
        label = ", ".join(f"{key}={value}" for key, value in zip(group_keys, group)) or None
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    low, high = min(xs), max(xs)
    if low > 0 and high / low > ratio:
        ax.set_xscale("log")
    ticks = sorted(set(xs))
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_xlabel(plot_x)
    if group_keys:
        ax.legend()
    ax.set_title(f"AP against {plot_x}")


def _plot_bars(ax, jobs: list[JobResult], keys: list[str]):
    labels = [job.name + "".join(f"\n{key}={job.overrides.get(key, '')}" for key in keys) for job in jobs]
    ax.bar(range(len(jobs)), [job.metrics["AP"] for job in jobs])
    ax.set_xticks(range(len(jobs)), labels, fontsize="small")
    ax.set_xlabel("job")
    ax.set_title("AP per job" if jobs else "AP per job (no finished job yet)")


def _read_json(path: Path) -> dict:
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err}); expected the stage's JSON output") from err
    if not isinstance(payload, dict):
        raise UserError(f"{path}: expected a JSON object")
    return payload


def _as_float(value: str | None) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _sort_key(value: str) -> tuple:
    """Numbers in numeric order before other strings."""
    number = _as_float(value)
    return (0, number, "") if number is not None and not math.isnan(number) else (1, 0.0, value)
