"""One owner per folder (vallex.locks): a second preparation of one folder, or a second training run of
one run.name, is refused with a message naming the first; a lock a killed process left is taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vallex.config import PrepareSection, load_config
from vallex.locks import LOCK_NAME, LockError, hold_lock

ROOT = Path(__file__).resolve().parents[1]

HOLDER = """
import sys, time
from vallex.locks import hold_lock
with hold_lock(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    time.sleep(120)
"""


def _hold_in_another_process(folder: Path, purpose: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder), purpose],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_preparation_or_training_run_is_refused_naming_the_first(tmp_path):
    from vallex.data.prepare import prepare_corpus
    from vallex.train.trainer import train

    cfg = load_config(None, [f"run.output_dir={tmp_path / 'run'}", "run.name=twice"])
    prepared, train_dir = Path(cfg.prepared_dir), cfg.train_dir
    holders = [
        _hold_in_another_process(prepared, f"preparation of {prepared}"),
        _hold_in_another_process(train_dir, "training run 'twice'"),
    ]
    try:
        with pytest.raises(LockError) as err:
            prepare_corpus([], prepared, PrepareSection(), progress=False)
        message = str(err.value)
        assert f"pid {holders[0].pid} on host {socket.gethostname()}" in message
        assert f"preparation of {prepared}" in message and "-c" in message  # the owner's command line
        assert not (prepared / "manifest.json").exists()

        with pytest.raises(LockError, match=rf"training run 'twice' \(pid {holders[1].pid} on host"):
            train(cfg)
        assert not (train_dir / "config.yaml").exists()

        # Another run.output_dir, the same train.storage_path: its Ray Train run folder is held.
        storage = Path(cfg.storage_path) / "twice"
        holders.append(_hold_in_another_process(storage, "training run 'twice' (its Ray Train checkpoints)"))
        other = load_config(
            None,
            [
                f"run.output_dir={tmp_path / 'other'}",
                "run.name=twice",
                f"train.storage_path={cfg.storage_path}",
            ],
        )
        with pytest.raises(LockError, match=rf"its Ray Train checkpoints\) \(pid {holders[2].pid} on host"):
            train(other)
        assert not (other.train_dir / "config.yaml").exists() and not (other.train_dir / LOCK_NAME).exists()
    finally:
        for proc in holders:
            proc.kill()
            proc.wait()

    # Killed (SIGKILL: no clean-up), the holders left their records; they name dead processes on this
    # host, so the next owner takes over.
    assert json.loads((prepared / LOCK_NAME).read_text())["pid"] == holders[0].pid
    with hold_lock(prepared, "preparation again") as record:
        assert json.loads((prepared / LOCK_NAME).read_text())["token"] == record["token"]
        with pytest.raises(LockError, match="already held by this process"), hold_lock(prepared, "nested"):
            pass
    assert not (prepared / LOCK_NAME).exists()  # released


def test_a_lock_of_another_host_or_a_live_process_is_never_taken_over(tmp_path):
    lock = tmp_path / LOCK_NAME
    alive = {"purpose": "x", "pid": os.getppid(), "started_unix": time.time()}  # our parent: alive
    for record, why in (
        ({**alive, "host": "gpu-node-7", "command": "ray_jobs/train.py"}, "cannot be checked from here"),
        ({**alive, "host": socket.gethostname()}, "that process is alive"),
    ):
        lock.write_text(json.dumps(record))
        with (
            pytest.raises(LockError, match=rf"{record['host']}.*{why}.*delete {lock}"),
            hold_lock(tmp_path, "preparation"),
        ):
            pass
        assert json.loads(lock.read_text()) == record  # left as it was


def test_credentials_in_the_command_line_are_masked(monkeypatch, tmp_path):
    monkeypatch.setattr(
        sys,
        "argv",
        ["train.py", "train.tracking_uri=https://bob:hunter2@mlflow.example", "wandb_token=abc123"],
    )
    with hold_lock(tmp_path, "training") as record:
        text = (tmp_path / LOCK_NAME).read_text()
    assert "hunter2" not in text and "abc123" not in text and "bob:***@mlflow.example" in record["command"]


def test_a_reused_pid_does_not_keep_a_stale_lock(tmp_path):
    """A record whose pid now belongs to a process started after the lock was taken is stale."""
    record = {"purpose": "x", "pid": os.getpid(), "host": socket.gethostname(), "started_unix": 1.0}
    (tmp_path / LOCK_NAME).write_text(json.dumps(record))
    with hold_lock(tmp_path, "next") as mine:
        assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == mine["token"]
