"""Each ray_jobs entry point end to end at tiny size: real espeak speech, phonemizer, EnCodec, Ray, DeepSpeed."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]
JOB = str(ROOT / "job.yaml")


def _main(name: str):
    return runpy.run_path(str(ROOT / "ray_jobs" / f"{name}.py"), run_name="vallex_test")["main"]


def _common(out: Path) -> list[str]:
    return [
        f"run.output_dir={out}",
        "corpus.languages=[fr, ar]",  # the smallest two demo languages keep this test short
        "corpus.demo_scale=0",  # and their hand-written sentences only (~3 min of audio)
        "train.cpus_per_worker=0.5",
        "train.max_steps=8",
        "train.warmup_steps=2",
        "train.eval_every=4",
        "train.checkpoint_every=8",
        "train.batch_size=4",
        "model.size=tiny",  # job.yaml's demo model (128 wide, 4 layers) is sized to learn to read, not to test
        "model.d_model=0",
    ]


@pytest.fixture(scope="module")
def prepared(ray_cluster, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("jobs")
    assert _main("prepare")(["--config", JOB, *_common(out)]) == 0
    return out


def test_prepare_entry_point(prepared):
    manifest = json.loads((prepared / "prepare" / "manifest.json").read_text())
    assert set(manifest["languages"]) == {"fr", "ar"}
    fr, ar = manifest["languages"]["fr"], manifest["languages"]["ar"]
    assert fr["utterances"]["train"] > 3 * ar["utterances"]["train"] > 0  # ar is the small language
    assert ar["utterances"]["valid"] > 0 and fr["speakers"] > 1
    for lang in ("fr", "ar"):
        rows = sum(
            pq.read_metadata(prepared / "prepare" / s).num_rows for s in manifest["languages"][lang]["shards"]
        )
        assert rows == sum(manifest["languages"][lang]["utterances"].values())
    assert (prepared / "logs" / "prepare.log").exists()


# ray_jobs/train.py runs end to end in tests/jobs/test_cluster.py: submitted as a job to a two-node cluster
# (TestTwoNodes) and as a driver that loses a node (elastic); its errors before Ray in test_plan.py.


def test_recognizer_entry_point(prepared):
    from vallex.eval.recognizer import RECOGNIZER_FILE, Recognizer

    budget = ["recognizer.steps=6", "recognizer.batch_size=4", "recognizer.dim=16", "recognizer.hidden=16"]
    argv = ["--config", JOB, *_common(prepared), *budget, "recognizer.cpus=1", "recognizer.log_every=3"]
    assert _main("recognizer")(argv) == 0
    rec = Recognizer.load(prepared / "prepare")  # beside the shards, for this corpus's symbols and codec
    assert (prepared / "prepare" / RECOGNIZER_FILE).is_file()
    assert rec.meta["steps"] == 6 and rec.meta["shape"]["dim"] == 16
    # recognizer.inputs=auto on job.yaml's mel_rvq codes: it reads the codec's 80-bin centroids.
    assert rec.meta["inputs"] == "features" and rec.shape.features == 80
    manifest = json.loads((prepared / "prepare" / "manifest.json").read_text())
    assert rec.meta["valid_utterances"] == {
        k: v["utterances"]["valid"] for k, v in manifest["languages"].items()
    }
    assert set(rec.meta["valid_per"]) == {"fr", "ar"}  # six steps learn nothing: about every phoneme wrong
    assert all(per > 0.5 for per in rec.meta["valid_per"].values()), rec.meta["valid_per"]
    # The worker's progress lines and the per-language table reach the driver's log.
    log = (prepared / "logs" / "recognizer.log").read_text()
    assert "recognizer step 3/6" in log and "recognizer step 6/6" in log
    for lang, per in rec.meta["valid_per"].items():
        assert f"{lang:<10}{f'{100 * per:.1f}%':>10}" in log


def test_demo_entry_point_reuses_prepared_shards(prepared):
    # Runs after test_recognizer_entry_point: the demo finds that recognizer beside the shards (a
    # missing one would be trained with recognizer.steps, 1000 by default) and scores PER with it.
    shards = sorted((prepared / "prepare").glob("*/part-*.parquet"))
    recognizer = prepared / "prepare" / "recognizer.pt"
    before = {p: p.stat().st_mtime_ns for p in [*shards, recognizer]}
    rc = _main("demo")(["--config", JOB, *_common(prepared), "run.name=demo-job"])
    assert {p: p.stat().st_mtime_ns for p in [*shards, recognizer]} == before  # both were already done
    report = json.loads((prepared / "train" / "report.json").read_text())
    assert report["intelligibility"]["per"] == "computed"
    assert report["intelligibility"]["recognizer_inputs"] == "features"
    # The demo's exit status says whether validation loss fell for every language.
    falling = all(v["last"]["loss"] < v["first"]["loss"] for v in report["languages"].values())
    assert rc == (0 if falling else 1)
    assert falling, report["languages"]
