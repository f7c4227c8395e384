"""Experiment tracking (train.tracking): MLflow and W&B, through Ray's integrations, get the same
per-language metrics as metrics.jsonl from a real two-worker run, and continue the same runs on resume.
That run also batches by a token budget (data.max_tokens): one pair of Ray Train starts for both."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from vallex.config import ConfigError, load_config
from vallex.data.synthetic import write_synthetic_corpus
from vallex.train.metrics import read_metrics
from vallex.train.trainer import train

ROOT = Path(__file__).resolve().parents[2]
SIZES = {"en": 200, "zh": 120, "ar": 20}


def _cfg(tmp_path: Path, *overrides: str):
    return load_config(
        None,
        [
            f"run.output_dir={tmp_path}",
            "run.name=tracked",
            "model.size=tiny",
            "train.num_workers=2",
            "train.cpus_per_worker=0.5",
            "train.zero_stage=2",
            "train.batch_size=32",  # the row cap; the token budget binds first
            "train.grad_accum=2",
            "train.max_steps=4",
            "train.warmup_steps=1",
            "train.eval_every=2",
            "train.checkpoint_every=4",
            "data.weights=uniform",
            "data.window_rows=64",
            "data.max_tokens=600",
            "data.bucket_rows=128",
            "train.intelligibility.samples=false",  # no listening samples: not what this test is about
            "train.intelligibility.text_gain=false",  # nor text gain (a second validation pass)
            "train.tracking=[mlflow, wandb]",
            "train.tracking_project=vallex-test",
            *overrides,
        ],
    )


def wandb_records(path: Path) -> list:
    """The records of a W&B ``.wandb`` file: LevelDB-log framing (7-byte file header, then 32 KiB blocks of
    chunks with a 7-byte header: crc32c, length, type) around protobuf ``Record`` messages. wandb 0.31
    reads these files in its Go core only, so the test reads them itself."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    block, pos, chunks, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero-filled rest of the block
            pos += left
            continue
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def wandb_history(path: Path) -> list[dict]:
    rows = []
    for r in wandb_records(path):
        if r.WhichOneof("record_type") == "history":
            rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item})
    return rows


def test_mlflow_and_wandb_get_the_runs_metrics_and_resume_into_the_same_runs(ray_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    write_synthetic_corpus(
        tmp_path / "prepare", SIZES, valid_per_language=4, frames=(10, 80), phonemes=(5, 10)
    )
    cfg = _cfg(tmp_path)
    train(cfg)

    records = read_metrics(cfg.train_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 4]
    # Token-budget batches: ~10 rows drawn at random from this corpus are ~37% padding; bucketed, < 20%.
    for r in records:
        assert r["padding_fraction"] is not None and r["padding_fraction"] < 0.2, r["padding_fraction"]
        assert r["languages_per_batch"] > 1.5
    # Variable batches: fewer rows than the 32-row cap would give (2 workers x 2 micro-steps x 4 steps).
    seen = records[-1]["samples_seen"]
    assert 2 * 2 * 4 * 3 < seen < 2 * 2 * 4 * 32
    expected = {lang: [(r["step"], r["valid"][lang]["loss"]) for r in records] for lang in SIZES}

    # MLflow: the default store is SQLite in the output dir; one run (rank 0's), finished.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("vallex-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    for lang, series in expected.items():
        history = client.get_metric_history(run.info.run_id, f"loss/{lang}")
        assert [(m.step, m.value) for m in history] == series
    assert run.data.params["train.max_steps"] == "4"
    assert run.data.params["data.weights"] == "uniform"
    assert "job.runtime_env" not in run.data.params  # may hold credentials
    assert {"loss_mean", "loss_max", "train_loss", "ar_loss/en", "nar_loss/zh"} <= set(run.data.metrics)

    # W&B offline: one run directory under <output_dir>/train/wandb holding every evaluation.
    (run_dir,) = (cfg.train_dir / "wandb").glob("offline-run-*")
    (wandb_file,) = run_dir.glob("run-*.wandb")
    rows = wandb_history(wandb_file)
    for lang, series in expected.items():
        assert [(row["step"], row[f"loss/{lang}"]) for row in rows] == series
    wandb_id = wandb_file.stem.removeprefix("run-")
    config = {  # the run's config: sent with the run record (and any later config records)
        i.key: json.loads(i.value_json)
        for r in wandb_records(wandb_file)
        if r.WhichOneof("record_type") in ("run", "config")
        for i in (r.run.config.update if r.WhichOneof("record_type") == "run" else r.config.update)
    }
    assert config["train"]["max_steps"] == 4 and config["train"]["tracking"] == ["mlflow", "wandb"]
    assert "job" not in config

    # Running it again with more steps resumes the checkpoint (skipping the batches already trained on)
    # and logs into the same runs.
    cfg2 = _cfg(tmp_path, "train.max_steps=6")
    train(cfg2)
    records = read_metrics(cfg2.train_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 4, 6]
    assert records[-1]["samples_seen"] > seen and records[-1]["padding_fraction"] < 0.2
    (run2,) = client.search_runs([experiment.experiment_id])
    assert run2.info.run_id == run.info.run_id and run2.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss/en")]
    assert steps == [1, 2, 4, 6]
    assert client.get_run(run.info.run_id).data.params["train.max_steps"] == "4"  # the first start's
    resumed = sorted((cfg.train_dir / "wandb").glob(f"offline-run-*-{wandb_id}/run-{wandb_id}.wandb"))
    assert len(resumed) == 2  # wandb writes one offline folder per start; `wandb sync` merges them by id
    assert [row["step"] for row in wandb_history(resumed[-1])] == [6]


@pytest.mark.parametrize(
    "override, key, fragment",
    [
        ("train.tracking=[mlfow]", "train.tracking[0]", "must be one of mlflow, wandb"),
        ("train.tracking=mlflow", "train.tracking", "must be a list of"),
        ("train.tracking=[wandb, wandb]", "train.tracking", "names a tracker twice"),
        ("train.wandb_mode=shared", "train.wandb_mode", "must be one of offline, online"),
    ],
)
def test_bad_tracking_values_name_the_key(override, key, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert err.value.key == key
    assert fragment in str(err.value)


def test_missing_tracker_package_fails_before_ray_starts():
    """An uninstalled tracker (import blocked in a fresh interpreter) is a config error of the entry
    point, naming the key and the install command, before anything starts."""
    script = (
        "import runpy, sys; sys.modules['wandb'] = None; "
        f"sys.argv = ['train.py', '--config', {str(ROOT / 'job.yaml')!r}, 'train.tracking=[mlflow, wandb]']; "
        f"runpy.run_path({str(ROOT / 'ray_jobs/train.py')!r}, run_name='__main__')"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "config error: train.tracking[1]: wandb is not installed; pip install 'vallex[tracking]'" in (
        proc.stderr
    )
    assert "Ray" not in proc.stderr.split("config error")[0]


@pytest.fixture
def mlflow_in_this_process(monkeypatch):
    """For a test that opens MLflow runs in the pytest process: setup_mlflow sets MLflow's tracking URI,
    a module global that MLflow mirrors into os.environ["MLFLOW_TRACKING_URI"] (so that subprocesses
    inherit it: a Ray cluster started later in the session would too). Both are put back afterwards."""
    import mlflow

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID"):
        if name in os.environ:  # someone's own setting: monkeypatch restores it after the reset below
            monkeypatch.setenv(name, os.environ[name])
    yield
    mlflow.set_tracking_uri(None)  # MLflow's global back to unset, and MLFLOW_TRACKING_URI removed


def test_in_process_mlflow_reopens_a_known_run_and_replaces_one_the_store_lacks(
    tmp_path, caplog, mlflow_in_this_process
):
    """A checkpoint's MLflow run id that the (new, or emptied) store does not know: the worker logs into
    a new run with the config as params instead of failing the training. A known id is reopened, and
    MLFLOW_RUN_ID (how the id reaches mlflow.start_run) is not left behind for a later start_run."""
    from mlflow.tracking import MlflowClient

    from vallex.train.tracking import Tracker, tracking_settings

    cfg = _cfg(tmp_path, "train.tracking=[mlflow]")
    with Tracker(tracking_settings(cfg)) as tracker:
        ids = tracker.open(rank=0, resume={"mlflow": "0" * 32})
        tracker.log({"step": 3, "loss/en": 1.5})
    assert ids["mlflow"] != "0" * 32 and "cannot reopen MLflow run" in caplog.text
    assert "MLFLOW_RUN_ID" not in os.environ
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(ids["mlflow"])
    assert run.info.status == "FINISHED" and run.data.params["train.tracking"] == "['mlflow']"
    assert run.data.metrics == {"loss/en": 1.5}

    with Tracker(tracking_settings(cfg)) as tracker:
        assert tracker.open(rank=0, resume=ids) == ids
        assert "MLFLOW_RUN_ID" not in os.environ
        tracker.log({"step": 5, "loss/en": 1.25})
    assert [(m.step, m.value) for m in client.get_metric_history(ids["mlflow"], "loss/en")] == [
        (3, 1.5),
        (5, 1.25),
    ]


def test_mlflow_run_id_is_not_left_set_when_reopening_fails_before_mlflow_reads_it(tmp_path, monkeypatch):
    """mlflow.start_run consumes MLFLOW_RUN_ID; an error before it gets there (here setup_mlflow itself
    failing) must not leave the id behind for the next start_run in this process."""
    import ray.air.integrations.mlflow

    from vallex.train.tracking import Tracker, tracking_settings

    def broken_setup_mlflow(**kwargs):
        raise RuntimeError("tracking store unreachable")

    monkeypatch.setattr(ray.air.integrations.mlflow, "setup_mlflow", broken_setup_mlflow)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    cfg = _cfg(tmp_path, "train.tracking=[mlflow]")
    with pytest.raises(RuntimeError, match="unreachable"), Tracker(tracking_settings(cfg)) as tracker:
        tracker.open(rank=0, resume={"mlflow": "1" * 32})
    assert "MLFLOW_RUN_ID" not in os.environ
