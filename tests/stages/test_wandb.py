"""W&B logging, read back from what W&B wrote (its offline `.wandb` transaction log and media files), not from
the code that logged it; and no W&B at all with the logger off."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from stages.engine.metrics import wandb_mode
from stages.report import find_job_dirs
from tests.helpers import ROOT, run_cli

OFFLINE = {"WANDB_MODE": "offline"}
SMOKE_CO_DETR = ["experiment=smoke", "model=co_deformable_detr", "model.num_aux_heads=1"]
# W&B's `.wandb` file: a header, then LevelDB-log framing: 32 KiB blocks of records, each with a 7-byte header
# (crc32, length, type); a protobuf `Record` spans one FULL (1) or FIRST (2) .. MIDDLE (3) .. LAST (4) chunks.
WANDB_HEADER = b":W&B"
HEADER_SIZE, BLOCK_SIZE, CHUNK_HEADER = 7, 32768, 7
FULL, LAST = 1, 4


def read_records(path: Path) -> list:
    """Every protobuf Record of an offline run's `run-<id>.wandb` file."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == WANDB_HEADER, f"{path} is not a W&B transaction log"
    records, pending, pos = [], b"", HEADER_SIZE
    while pos + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK_SIZE - pos % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        pending += data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


class OfflineRun:
    """What one offline run directory holds: the run record, its history keys, its final summary, artifacts."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir
        records = read_records(next(run_dir.glob("run-*.wandb")))
        self.run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        self.config = {u.key: json.loads(u.value_json) for u in self.run.config.update}
        self.history: dict[str, object] = {}
        self.summary: dict[str, object] = {}
        self.artifacts = []
        for record in records:
            kind = record.WhichOneof("record_type")
            if kind == "history":
                self.history.update({item_key(i): json.loads(i.value_json) for i in record.history.item})
            elif kind == "summary":
                self.summary.update({item_key(i): json.loads(i.value_json) for i in record.summary.update})
            elif kind == "artifact":
                self.artifacts.append(record.artifact)


def offline_runs(run_dir: Path) -> dict[str, OfflineRun]:
    """The offline runs under <run_dir>/wandb, by job type (one per stage)."""
    runs = [OfflineRun(d) for d in sorted((run_dir / "wandb").glob("offline-run-*"))]
    by_type = {run.run.job_type: run for run in runs}
    assert len(by_type) == len(runs), [run.run.job_type for run in runs]
    return by_type


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory, data_dir) -> Path:
    """A smoke finetune (ending with its evaluation) logged to W&B offline, its checkpoint as an artifact."""
    run_dir = tmp_path_factory.mktemp("wandb_run")
    args = [*SMOKE_CO_DETR, "stage=finetune", "logger=wandb", "logger.tags=[smoke,ci]", "logger.log_checkpoints=true"]
    proc = run_cli(args, run_dir, data_dir, env=OFFLINE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_offline_run_holds_the_resolved_config_grouped_loss_keys_and_lr(wandb_run):
    runs = offline_runs(wandb_run)
    assert set(runs) == {"finetune", "eval"}
    finetune = runs["finetune"]
    assert finetune.run.project == "detpipe"
    assert list(finetune.run.tags) == ["smoke", "ci"]
    # A single run's group is its run directory; every stage of it shares the group.
    assert finetune.run.run_group == runs["eval"].run.run_group == "/".join(wandb_run.parts[-2:])
    # The resolved config: values, not interpolations.
    assert finetune.config["model"]["num_aux_heads"] == 1
    assert finetune.config["paths"]["run_dir"] == str(wandb_run)
    assert finetune.config["stage"]["name"] == "finetune"
    # Loss terms under their head's prefix (W&B's panel sections), as metrics.jsonl has them.
    assert {"detr/loss_cls", "detr/loss_bbox", "aux0_atss/loss_cls", "aux0_atss_queries/loss_cls", "loss", "lr"} <= set(
        finetune.history
    )
    logged = json.loads((wandb_run / "finetune" / "metrics.jsonl").read_text().splitlines()[-1])
    assert finetune.history["_step"] == logged["iter"]
    assert finetune.history["detr/loss_cls"] == pytest.approx(logged["detr/loss_cls"])


def test_eval_run_has_the_ap_metrics_as_summary_values(wandb_run):
    evaluation = offline_runs(wandb_run)["eval"]
    bbox = json.loads((wandb_run / "eval" / "metrics.json").read_text())["bbox"]
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        assert evaluation.summary[f"eval/{key}"] == pytest.approx(bbox[key])
    assert evaluation.config["stage"]["name"] == "eval"


def test_final_checkpoint_is_logged_as_a_model_artifact(wandb_run):
    (artifact,) = offline_runs(wandb_run)["finetune"].artifacts
    assert artifact.type == "model"
    (entry,) = artifact.manifest.contents
    assert Path(entry.local_path) == wandb_run / "finetune" / "checkpoint.pth"


def test_val_pictures_carry_true_and_predicted_box_overlays_with_class_names(wandb_run, data_dir, tmp_path):
    # The eval stage alone with every prediction drawn: smoke scores are below the default threshold.
    args = [*SMOKE_CO_DETR, "stage=eval", f"stage.init_from={wandb_run / 'finetune'}", "logger=wandb"]
    proc = run_cli([*args, "stage.vis_score_threshold=0.0", "stage.num_vis=2"], tmp_path, data_dir, env=OFFLINE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluation = offline_runs(tmp_path)["eval"]
    pictures = sorted({key.split("/")[1] for key in evaluation.history if key.startswith("eval_vis/")})
    assert len(pictures) == 2
    class_names = None
    for picture in pictures:
        assert evaluation.history[f"eval_vis/{picture}/_type"] == "image-file"
        overlays = {}
        for name in ("ground_truth", "predictions"):
            path = evaluation.history[f"eval_vis/{picture}/boxes/{name}/path"]
            overlays[name] = json.loads((evaluation.dir / "files" / path).read_text())
        truth, predictions = overlays["ground_truth"], overlays["predictions"]
        assert truth["box_data"] and predictions["box_data"]
        assert all("score" in box["scores"] for box in predictions["box_data"])
        class_names = truth["class_labels"]
        for box in truth["box_data"] + predictions["box_data"]:
            assert box["domain"] == "pixel" and box["box_caption"].startswith(class_names[str(box["class_id"])])
    gt = json.loads(Path(evaluation.config["data"]["root"], evaluation.config["data"]["val_json"]).read_text())
    assert sorted(class_names.values()) == sorted(c["name"] for c in gt["categories"])


def test_sweep_jobs_share_the_sweep_as_group_and_are_named_by_their_swept_values(tmp_path, data_dir):
    sweep_dir = tmp_path / "multirun" / "2024-05-01" / "12-00-00"
    args = ["-m", "experiment=smoke", "stage=finetune", "logger=wandb", "data.fraction=0.5,1.0"]
    args += ["trainer.max_iters=1", "stage.evaluate=false", f"hydra.sweep.dir={sweep_dir}"]
    proc = run_cli(args, tmp_path / "unused", data_dir, env=OFFLINE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [offline_runs(job)["finetune"].run for job in find_job_dirs(sweep_dir)]
    assert len(runs) == 2
    assert {run.run_group for run in runs} == {"2024-05-01/12-00-00"}
    assert sorted(run.display_name for run in runs) == ["fraction=0.5", "fraction=1.0"]


# Runs `run.py` in-process and reports, at exit, whether anything imported wandb.
NO_WANDB_SCRIPT = """
import atexit, runpy, sys
marker = sys.argv.pop(1)
atexit.register(lambda: open(marker, "w").write(str("wandb" in sys.modules)))
sys.argv[0] = {run_py!r}
runpy.run_path({run_py!r}, run_name="__main__")
"""


def test_logger_off_never_imports_wandb_nor_writes_its_files(tmp_path, data_dir):
    run_py = str(ROOT / "run.py")
    marker = tmp_path / "wandb_imported.txt"
    cmd = [sys.executable, "-c", NO_WANDB_SCRIPT.format(run_py=run_py), str(marker)]
    args = ["experiment=smoke", "stage=finetune", "logger=none", "trainer.max_iters=1"]
    proc = run_cli(args, tmp_path / "run", data_dir, cmd=cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "eval" / "metrics.json").is_file()  # training and evaluation both ran
    assert marker.read_text() == "False"
    assert not list((tmp_path / "run").rglob("wandb"))


def test_mode_is_offline_without_a_key_online_with_one_and_an_explicit_mode_wins(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine example.org login user password secret\n")
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_mode(None) == "offline"
    netrc.write_text("machine api.wandb.ai login user password 0123456789\n")
    assert wandb_mode(None) == "online"
    monkeypatch.setenv("NETRC", str(tmp_path / "absent"))
    monkeypatch.setenv("WANDB_API_KEY", "0123456789")
    assert wandb_mode(None) == "online"
    assert wandb_mode("offline") == "offline"
