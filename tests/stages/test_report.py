"""The report stage reads a sweep directory laid out as README "Outputs" says, and the launcher configs compose."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from stages.errors import UserError
from stages.report import FAILED, FINISHED, METRIC_KEYS, UNFINISHED, find_job_dirs, read_report_csv, run
from stages.sweep import ERROR_FILE
from tests.helpers import CONF_DIR

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Overriding a plugin's config by name makes Hydra warn about automatic schema matching (see the launcher yamls).
SCHEMA_NOTICE = "ignore:(?s).*validated against ConfigStore schema with the same name"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _make_job(sweep: Path, name: str, heads: int, fraction: float, ap: float | None, seconds: float | None):
    """A job directory as Hydra and the stages leave it; ap=None leaves it without eval/metrics.json."""
    job = sweep / name
    overrides = [
        "stage=finetune",
        "stage.init_from=/pretrain/box_pretrain",
        f"model.num_aux_heads={heads}",
        f"data.fraction={fraction}",
    ]
    _write(job / ".hydra" / "overrides.yaml", yaml.safe_dump(overrides))
    _write(job / ".hydra" / "config.yaml", yaml.safe_dump({"stage": {"name": "finetune"}}))
    if seconds is not None:
        summary = {"stage": "finetune", "checkpoint": str(job / "finetune" / "checkpoint.pth")}
        summary.update({"metrics": {"loss": 1.0}, "train_seconds": seconds, "seconds": seconds + 5.0})
        _write(job / "finetune" / "summary.json", json.dumps(summary))
    if ap is not None:
        bbox = {key: ap + offset for offset, key in enumerate(METRIC_KEYS)}
        bbox["per_class"] = {"square": ap}
        _write(job / "eval" / "metrics.json", json.dumps({"bbox": bbox}))


def _expected_ap(heads: int, fraction: float) -> float:
    return 10.0 * heads + 100.0 * fraction


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A 2x2 sweep (K in {0, 2} x fraction in {0.01, 0.5}) plus a fifth job that trained but was not evaluated."""
    sweep = tmp_path / "multirun" / "2026-11-23" / "12-00-00"
    grid = [(heads, fraction) for heads in (0, 2) for fraction in (0.01, 0.5)]
    for num, (heads, fraction) in enumerate(grid):
        _make_job(sweep, str(num), heads, fraction, _expected_ap(heads, fraction), seconds=100.0 + num)
    _make_job(sweep, "4", 1, 0.5, ap=None, seconds=42.0)
    # Things a sweep directory also holds that are not jobs.
    _write(sweep / "multirun.yaml", "hydra: {}\n")
    (sweep / ".submitit" / "1234").mkdir(parents=True)
    return sweep


def _report_cfg(sweep_dir: Path | None, run_dir: Path):
    overrides = ["stage=report", f"paths.run_dir={run_dir}"]
    if sweep_dir is not None:
        overrides.append(f"stage.sweep_dir={sweep_dir}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_report_has_one_row_per_job_with_swept_values_metrics_and_status(sweep: Path, tmp_path: Path, capsys):
    run_dir = tmp_path / "report_run"
    summary = run(_report_cfg(sweep, run_dir))

    rows = read_report_csv(run_dir / "report" / "report.csv")
    assert [row["job"] for row in rows] == ["0", "1", "2", "3", "4"]
    # Only keys that differ between jobs are columns; stage and init_from are the same everywhere.
    columns = ["job", "model.num_aux_heads", "data.fraction", *METRIC_KEYS, "train_seconds", "status", "error"]
    assert list(rows[0]) == columns
    finished = [row for row in rows if row["status"] == FINISHED]
    assert len(finished) == 4
    for num, row in enumerate(finished):
        heads, fraction = int(row["model.num_aux_heads"]), float(row["data.fraction"])
        for offset, key in enumerate(METRIC_KEYS):
            assert row[key] == pytest.approx(_expected_ap(heads, fraction) + offset)
        assert row["train_seconds"] == pytest.approx(100.0 + num)
    unfinished = rows[4]
    assert unfinished["status"] == UNFINISHED
    assert unfinished["AP"] is None and unfinished["train_seconds"] == pytest.approx(42.0)

    markdown = (run_dir / "report" / "report.md").read_text()
    table_rows = [line for line in markdown.splitlines() if line.startswith("| ") and "status" not in line]
    assert len(table_rows) == 5
    assert "| 3 | 2 | 0.5 | 70.00 | 71.00 |" in markdown
    assert "| 4 | 1 | 0.5 | - |" in markdown
    assert "| 3 | 2 | 0.5 | 70.00 |" in capsys.readouterr().out

    for directory in (run_dir / "report", sweep):
        assert (directory / "report.png").read_bytes().startswith(PNG_MAGIC)
    assert (sweep / "report.csv").read_bytes() == (run_dir / "report" / "report.csv").read_bytes()

    written = json.loads((run_dir / "report" / "summary.json").read_text())
    assert written["metrics"]["num_finished"] == summary["metrics"]["num_finished"] == 4
    assert written["metrics"]["best_job"] == "3"
    assert written["unfinished_jobs"] == ["4"]
    assert written["failed_jobs"] == [] and written["metrics"]["num_failed"] == 0


def test_failed_job_is_listed_as_failed_with_its_one_line_error(sweep: Path, tmp_path: Path, capsys):
    # What stages/sweep.py writes for a job whose stage raised; its earlier metrics do not make it finished.
    record = {"error": "data.fraction: got 7; expected a number in (0, 1] | x", "type": "UserError", "overrides": []}
    _write(sweep / "1" / ERROR_FILE, json.dumps(record))
    run_dir = tmp_path / "report_run"
    summary = run(_report_cfg(sweep, run_dir))

    rows = read_report_csv(run_dir / "report" / "report.csv")
    assert [row["status"] for row in rows] == [FINISHED, FAILED, FINISHED, FINISHED, UNFINISHED]
    assert rows[1]["error"] == record["error"] and rows[0]["error"] == ""
    markdown = (run_dir / "report" / "report.md").read_text()
    assert "| failed | data.fraction: got 7; expected a number in (0, 1] \\| x |" in markdown
    assert summary["failed_jobs"] == [{"job": "1", "error": record["error"]}]
    assert summary["metrics"]["num_failed"] == 1 and summary["metrics"]["num_finished"] == 3
    assert "3 of 5 jobs finished, 1 failed" in capsys.readouterr().out


def test_job_directories_named_by_number_and_overrides_hash_are_read_in_job_order(tmp_path: Path):
    sweep = tmp_path / "sweep"
    for num in (10, 2, 0):
        _make_job(sweep, f"{num}_{num:08x}", num, 0.5, ap=float(num), seconds=1.0)
    assert [job.name for job in find_job_dirs(sweep)] == ["0_00000000", "2_00000002", "10_0000000a"]


def test_sweep_over_one_non_numeric_key_still_writes_a_bar_chart(tmp_path: Path):
    sweep = tmp_path / "sweep"
    for num, head in enumerate(("atss", "faster_rcnn")):
        job = sweep / str(num)
        _write(job / ".hydra" / "overrides.yaml", yaml.safe_dump([f"model.first_head={head}"]))
        _write(job / "eval" / "metrics.json", json.dumps({"bbox": dict.fromkeys(METRIC_KEYS, 1.0 + num)}))
    run_dir = tmp_path / "run"
    run(_report_cfg(sweep, run_dir))
    rows = read_report_csv(run_dir / "report" / "report.csv")
    assert [row["model.first_head"] for row in rows] == ["atss", "faster_rcnn"]
    assert [row["train_seconds"] for row in rows] == [None, None]
    assert (run_dir / "report" / "report.png").read_bytes().startswith(PNG_MAGIC)


def test_missing_sweep_dir_is_a_one_line_user_error(tmp_path: Path):
    missing = tmp_path / "no_such_sweep"
    with pytest.raises(UserError, match="does not exist") as err:
        run(_report_cfg(missing, tmp_path / "run"))
    assert str(missing) in str(err.value) and "\n" not in str(err.value)


def test_sweep_dir_without_jobs_is_a_user_error(tmp_path: Path):
    empty = tmp_path / "empty_sweep"
    (empty / "not_a_job").mkdir(parents=True)
    with pytest.raises(UserError, match="holds no job directory"):
        run(_report_cfg(empty, tmp_path / "run"))


def test_unset_sweep_dir_is_a_user_error(tmp_path: Path):
    with pytest.raises(UserError, match="stage.sweep_dir: not set"):
        run(_report_cfg(None, tmp_path / "run"))


def test_metrics_file_without_box_ap_is_a_user_error_naming_it(sweep: Path, tmp_path: Path):
    _write(sweep / "1" / "eval" / "metrics.json", json.dumps({"bbox": {"AP": 3.0}}))
    with pytest.raises(UserError, match=r"1/eval/metrics.json: 'bbox' lacks"):
        run(_report_cfg(sweep, tmp_path / "run"))


def _launcher_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


@pytest.mark.filterwarnings(SCHEMA_NOTICE)
def test_submitit_slurm_launcher_config_composes_with_cluster_settings():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra.errors import ConfigCompositionException
    from hydra.utils import instantiate

    cfg = _launcher_cfg(["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu", "hydra.launcher.nodes=2"])
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    assert launcher.params["partition"] == "gpu" and launcher.params["nodes"] == 2
    assert launcher.params["gpus_per_node"] == launcher.params["tasks_per_node"]
    # The plugin's schema still checks the file: a misspelt setting fails instead of being ignored.
    with pytest.raises(ConfigCompositionException):
        _launcher_cfg(["hydra/launcher=submitit_slurm", "hydra.launcher.partiton=gpu"])


@pytest.mark.filterwarnings(SCHEMA_NOTICE)
def test_joblib_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    from hydra.utils import instantiate

    cfg = _launcher_cfg(["hydra/launcher=joblib", "hydra.launcher.n_jobs=3"])
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "JoblibLauncher"
    assert launcher.joblib["n_jobs"] == 3


def test_joblib_launcher_runs_sweep_jobs_in_parallel_processes(sweep: Path, tmp_path: Path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    second = tmp_path / "second_sweep"
    _make_job(second, "0", 0, 1.0, ap=5.0, seconds=1.0)
    multirun = tmp_path / "reports"
    command = [sys.executable, "run.py", "-m", "hydra/launcher=joblib", "stage=report"]
    command += [f"stage.sweep_dir={sweep},{second}", f"hydra.sweep.dir={multirun}"]
    result = subprocess.run(command, cwd=CONF_DIR.parent, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    first, second = find_job_dirs(multirun)
    assert len(read_report_csv(first / "report" / "report.csv")) == 5
    assert len(read_report_csv(second / "report" / "report.csv")) == 1
