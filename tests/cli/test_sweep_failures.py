"""Sweeps that survive a failing job, sweep job directories named by their overrides, and run directories that
are unique per run and shared by the ranks of one torchrun.

Most sweeps here run `stage=report` over small hand-made sweep directories: a job takes about a second, so the
launcher and failure handling are tested without training. One smoke training sweep checks the real case.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from stages import sweep
from stages.report import find_job_dirs, read_report_csv
from tests.helpers import CONF_DIR, ROOT, run_cli

JOB_NAME = re.compile(r"(\d+)_[0-9a-f]{8}")
RUN_NAME = re.compile(r"\d{4}-\d{2}-\d{2}/\d{2}-\d{2}-\d{2}_[0-9a-f]{4}")
# Overriding a plugin's config by name makes Hydra warn about automatic schema matching (see the launcher yamls).
SCHEMA_NOTICE = "ignore:(?s).*validated against ConfigStore schema with the same name"


def make_sweep_dir(path: Path, ap: object = 5.0) -> Path:
    """A finished sweep of one job, for `stage=report` jobs to read. A non-numeric `ap` makes its report fail
    with a ValueError (not a UserError)."""
    job = path / "0_0123abcd"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["model.num_aux_heads=0"]))
    (job / "eval").mkdir()
    bbox = dict.fromkeys(("AP", "AP50", "AP75", "APs", "APm", "APl"), ap)
    (job / "eval" / "metrics.json").write_text(json.dumps({"bbox": bbox}))
    return path


def report_sweep(sweep_dir: Path, report_dirs: list[Path], data_dir: Path, *extra: str):
    """`python run.py -m stage=report stage.sweep_dir=<a>,<b>,...`: one report job per directory."""
    args = ["-m", *extra, "stage=report", f"stage.sweep_dir={','.join(map(str, report_dirs))}"]
    return run_cli([*args, f"hydra.sweep.dir={sweep_dir}"], sweep_dir / "unused", data_dir, timeout=120)


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


def job_of(sweep_dir: Path, num: int) -> Path:
    (job,) = [p for p in find_job_dirs(sweep_dir) if sweep.job_number(p.name) == num]
    return job


def test_a_failing_job_is_recorded_and_the_jobs_after_it_still_run(tmp_path, data_dir):
    good, missing = make_sweep_dir(tmp_path / "good"), tmp_path / "missing"
    sweep_dir = tmp_path / "multirun"
    proc = report_sweep(sweep_dir, [missing, good], data_dir)

    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    failed, later = job_of(sweep_dir, 0), job_of(sweep_dir, 1)
    assert (later / "report" / "report.csv").is_file() and not (later / sweep.ERROR_FILE).exists()
    record = json.loads((failed / sweep.ERROR_FILE).read_text())
    assert record["type"] == "UserError"
    assert record["error"] == f"{missing}: sweep directory does not exist; expected a Hydra multirun directory"
    assert f"stage.sweep_dir={missing}" in record["overrides"] and "stage=report" in record["overrides"]
    assert error_lines(proc) == [
        f"error: job {failed.name} ({' '.join(record['overrides'])}): {record['error']}",
        f"error: 1 of 2 jobs failed (sweep directory {sweep_dir})",
    ]


def test_an_unexpected_exception_in_a_job_logs_its_traceback_and_the_sweep_goes_on(tmp_path, data_dir):
    bad, good = make_sweep_dir(tmp_path / "bad", ap="not a number"), make_sweep_dir(tmp_path / "good")
    sweep_dir = tmp_path / "multirun"
    proc = report_sweep(sweep_dir, [bad, good], data_dir)

    assert proc.returncode == 1, proc.stderr[-3000:]
    failed = job_of(sweep_dir, 0)
    record = json.loads((failed / sweep.ERROR_FILE).read_text())
    assert record["type"] == "ValueError" and record["error"].startswith("ValueError: could not convert")
    assert "Traceback" in (failed / "run.log").read_text()
    assert (job_of(sweep_dir, 1) / "report" / "report.csv").is_file()
    assert f"error: job {failed.name} (" in proc.stderr


@pytest.mark.filterwarnings(SCHEMA_NOTICE)
def test_joblib_launcher_records_failures_from_its_worker_processes(tmp_path, data_dir):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    good, missing = make_sweep_dir(tmp_path / "good"), tmp_path / "missing"
    sweep_dir = tmp_path / "multirun"
    proc = report_sweep(sweep_dir, [missing, good, good], data_dir, "hydra/launcher=joblib")

    assert proc.returncode == 1, proc.stderr[-3000:]
    jobs = find_job_dirs(sweep_dir)
    assert [sweep.job_number(job.name) for job in jobs] == [0, 1, 2]
    assert [(job / sweep.ERROR_FILE).is_file() for job in jobs] == [True, False, False]
    assert f"error: job {jobs[0].name} (" in proc.stderr and "error: 1 of 3 jobs failed" in proc.stderr


def test_rerun_pairs_each_job_with_its_directory_only_while_its_overrides_are_the_same(tmp_path, data_dir):
    first, second = make_sweep_dir(tmp_path / "first"), tmp_path / "second"
    sweep_dir = tmp_path / "multirun"
    assert report_sweep(sweep_dir, [first, second], data_dir).returncode == 1
    names = [job.name for job in find_job_dirs(sweep_dir)]
    assert all(JOB_NAME.fullmatch(name) for name in names), names

    # The same sweep again, now that its second directory exists: the same job directories, the stale error gone.
    make_sweep_dir(second)
    proc = report_sweep(sweep_dir, [first, second], data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [job.name for job in find_job_dirs(sweep_dir)] == names
    assert not list(sweep_dir.glob(f"*/{sweep.ERROR_FILE}"))

    # A changed value list: job 1 now reports another directory, so it gets a new directory; job 0 keeps its own.
    third = make_sweep_dir(tmp_path / "third")
    proc = report_sweep(sweep_dir, [first, third], data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = [job.name for job in find_job_dirs(sweep_dir)]
    assert len(after) == 3 and names[0] in after and names[1] in after
    (new,) = set(after) - set(names)
    assert sweep.job_number(new) == 1
    assert f"stage.sweep_dir={third}" in (sweep_dir / new / ".hydra" / "overrides.yaml").read_text()


def test_failures_left_by_an_earlier_sweep_do_not_fail_a_later_one(tmp_path, data_dir):
    good, missing = make_sweep_dir(tmp_path / "good"), tmp_path / "missing"
    sweep_dir = tmp_path / "multirun"
    assert report_sweep(sweep_dir, [good, missing], data_dir).returncode == 1
    proc = report_sweep(sweep_dir, [good], data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not error_lines(proc)


def test_smoke_training_sweep_with_a_bad_value_trains_the_rest_and_the_report_shows_the_failure(tmp_path, data_dir):
    sweep_dir = tmp_path / "multirun"
    args = ["-m", "experiment=smoke", "stage=finetune", "data.fraction=7,1.0"]
    # Few steps and no periodic last.pth: each smoke checkpoint is large and written with fsync.
    args += ["trainer.max_iters=2", "trainer.checkpoint_every=100", f"hydra.sweep.dir={sweep_dir}"]
    proc = run_cli(args, tmp_path / "unused", data_dir, timeout=600)

    assert proc.returncode == 1, proc.stderr[-3000:]
    failed, trained = job_of(sweep_dir, 0), job_of(sweep_dir, 1)
    assert (trained / "eval" / "metrics.json").is_file()
    (line, count) = error_lines(proc)
    assert line.startswith(f"error: job {failed.name} (") and "data.fraction=7 " in line
    assert line.endswith("data.fraction: got 7; expected a number in (0, 1]")
    assert count == f"error: 1 of 2 jobs failed (sweep directory {sweep_dir})"

    proc = run_cli(["stage=report", f"stage.sweep_dir={sweep_dir}"], tmp_path / "report", data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_report_csv(tmp_path / "report" / "report" / "report.csv")
    assert [(row["job"], row["status"]) for row in rows] == [(failed.name, "failed"), (trained.name, "finished")]
    assert rows[0]["error"] == "data.fraction: got 7; expected a number in (0, 1]" and rows[1]["error"] == ""
    summary = json.loads((tmp_path / "report" / "report" / "summary.json").read_text())
    assert summary["failed_jobs"] == [{"job": failed.name, "error": rows[0]["error"]}]
    assert f"| {failed.name} | 7 |" in (tmp_path / "report" / "report" / "report.md").read_text()


# --- names -----------------------------------------------------------------------------------------------------


def test_overrides_hash_is_stable_and_changes_with_any_override():
    base = "data.fraction=0.1,model.num_aux_heads=2"
    assert sweep.overrides_hash(base, 8) == sweep.overrides_hash(base, 8)
    assert len(sweep.overrides_hash(base, 8)) == 8
    assert sweep.overrides_hash(base, 8) != sweep.overrides_hash("data.fraction=0.5,model.num_aux_heads=2", 8)
    assert sweep.overrides_hash("", 8) != sweep.overrides_hash(base, 8)


def test_job_directories_sort_by_job_number():
    names = ["10_aaaaaaaa", "2_ffffffff", "1", "0_bbbbbbbb", "report.csv"]
    assert [p.name for p in sorted(map(Path, names), key=sweep.job_sort_key)] == [
        "0_bbbbbbbb",
        "1",
        "2_ffffffff",
        "10_aaaaaaaa",
        "report.csv",
    ]


@pytest.fixture
def fresh_run_start(monkeypatch):
    """A process that has not chosen its run id yet."""
    monkeypatch.setattr(sweep, "_run_start", None)
    monkeypatch.delenv(sweep.RUN_ID_ENV, raising=False)
    for name in ("WORLD_SIZE", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)


def test_runs_started_in_the_same_second_get_different_run_ids(monkeypatch, fresh_run_start):
    monkeypatch.setattr(sweep.time, "time", lambda: 1_780_000_000.25)
    first = sweep.run_id("%Y-%m-%d/%H-%M-%S", 4)
    monkeypatch.setattr(sweep, "_run_start", None)  # a second process, started in the same second
    second = sweep.run_id("%Y-%m-%d/%H-%M-%S", 4)
    assert RUN_NAME.fullmatch(first) and RUN_NAME.fullmatch(second)
    assert first.split("_")[0] == second.split("_")[0] and first != second


def test_run_id_is_chosen_once_per_process(monkeypatch, fresh_run_start):
    first = sweep.run_id("%Y-%m-%d/%H-%M-%S", 4)
    monkeypatch.setattr(sweep.time, "time", lambda: 2_000_000_000.0)
    assert sweep.run_id("%Y-%m-%d/%H-%M-%S", 4) == first
    # Another pattern shows the same moment and suffix.
    assert first.startswith(sweep.run_id("%Y-%m-%d", 4).split("_")[0]) and sweep.run_id("%Y", 6)[5:9] == first[-4:]


def test_config_names_runs_by_date_time_and_suffix_and_detpipe_run_id_pins_it(monkeypatch, fresh_run_start):
    def hydra_dirs():
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=["paths.output_dir=/out"], return_hydra_config=True)
        return str(cfg.hydra.run.dir), str(cfg.hydra.sweep.dir)

    run_dir, sweep_dir = hydra_dirs()
    assert RUN_NAME.fullmatch(run_dir.removeprefix("/out/")), run_dir
    assert sweep_dir == f"multirun/{run_dir.removeprefix('/out/')}"
    monkeypatch.setenv(sweep.RUN_ID_ENV, "ablation-7")
    assert hydra_dirs() == ("/out/ablation-7", "multirun/ablation-7")


def cli_env() -> dict[str, str]:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop(sweep.RUN_ID_ENV, None)
    return env


def run_dirs(output_dir: Path) -> list[Path]:
    return sorted(p.parent for p in output_dir.glob("*/*/.hydra"))


def test_two_runs_started_together_get_their_own_directories(tmp_path, data_dir):
    # Two processes started at once, without hydra.run.dir; their stage fails fast, after Hydra made the run dir.
    command = [sys.executable, str(ROOT / "run.py"), "stage=report", f"stage.sweep_dir={tmp_path / 'missing'}"]
    command += [f"paths.output_dir={tmp_path / 'outputs'}", f"paths.data_dir={data_dir}"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs = [subprocess.Popen(command, cwd=ROOT, env=cli_env(), **quiet) for _ in range(2)]
    assert [proc.wait(timeout=120) for proc in procs] == [1, 1]
    dirs = run_dirs(tmp_path / "outputs")
    assert len(dirs) == 2
    assert all(RUN_NAME.fullmatch(f"{d.parent.name}/{d.name}") for d in dirs), dirs


def test_ranks_of_one_torchrun_share_one_run_directory(tmp_path, data_dir):
    # --standalone: torchrun picks a free port and hosts the rendezvous store the ranks share the run id through.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = [*torchrun, str(ROOT / "run.py"), "experiment=smoke", "stage=finetune", "trainer.dist_backend=gloo"]
    command += ["trainer.max_iters=2", "trainer.checkpoint_every=100", "stage.evaluate=false"]
    command += [f"paths.output_dir={tmp_path / 'outputs'}", f"paths.data_dir={data_dir}"]
    proc = subprocess.run(command, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path / "outputs")
    assert json.loads((run_dir / "finetune" / "summary.json").read_text())["iterations"] == 2
