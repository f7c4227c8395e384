"""Prepared shards and training checkpoints on S3, against a real local S3 endpoint (moto's server).

pyarrow's S3 filesystem (what vallex and Ray Train use for every ``s3://`` URI) finds the endpoint and
credentials in the standard ``AWS_*`` environment variables, and Ray's workers (Ray Data tasks, Ray
Train workers) inherit the environment of the process that starts the cluster. So the ``s3`` fixture
sets the variables only while this module runs, and runs this module on a Ray cluster of its own,
started after they are set: the session's shared cluster (``ray_cluster`` in conftest.py) predates
them, and a runtime_env could only be given to ``ray.init``, which the shared cluster has already
had. The shared cluster, if an earlier module started it, is started again (without the variables)
for the modules after this one. Tests here must therefore not ask for ``ray_cluster``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from tests.conftest import start_local_ray
from tests.data.test_prepare import (
    SETTINGS,  # rows_per_shard=4: en (7 rows) and ar (5 rows) get 2 shards each
)
from vallex import files
from vallex.config import ConfigError, load_config
from vallex.data.corpus import CorpusError, PreparedCorpus
from vallex.data.demo_corpus import make_demo_corpus
from vallex.data.mixing import build_mixed_dataset
from vallex.data.prepare import _write_parquet, prepare_corpus
from vallex.data.schema import codes_matrix
from vallex.data.sources import read_manifest
from vallex.files import filesystem, write_text

pytest.importorskip("moto")

BUCKET = "vallex-test"


@pytest.fixture(scope="module")
def s3():
    """An S3 endpoint with an empty bucket, which the driver and every Ray worker reach."""
    import ray
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # port 0: any free one
    server.start()
    host, port = server.get_host_and_port()  # the port the server is bound to
    endpoint = f"http://{host}:{port}"
    shared = (
        ray.is_initialized()
    )  # the session's cluster, if a test started it first (conftest runs this module first)
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("AWS_ENDPOINT_URL", endpoint)
            env.setenv("AWS_ACCESS_KEY_ID", "testing")
            env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            env.setenv("AWS_DEFAULT_REGION", "us-east-1")
            for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):  # would win over ours
                env.delenv(name, raising=False)
            pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir(BUCKET)
            if shared:
                ray.shutdown()
            start_local_ray()  # after the variables are set: its workers inherit them
            try:

                @ray.remote(num_cpus=0)
                def worker_endpoint() -> str | None:
                    return os.environ.get("AWS_ENDPOINT_URL")

                assert ray.get(worker_endpoint.remote()) == endpoint
                yield f"s3://{BUCKET}"
            finally:
                ray.shutdown()
    finally:
        server.stop()
        if shared and not ray.is_initialized():  # (still up if the set-up failed before stopping it)
            start_local_ray()  # the variables are gone again: the later modules' cluster never sees them


def _objects(uri: str) -> dict[str, pafs.FileInfo]:
    """Every object under ``uri``, by key relative to it."""
    fs, root = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return {i.path[len(root) + 1 :]: i for i in infos if i.type == pafs.FileType.File}


class FailingUploads:
    """A pyarrow filesystem whose uploads fail with a network error after sending ``commit`` of the
    data (``"half"`` or ``"all"``), which pyarrow's output stream commits as the object when the error
    closes it, or before sending anything (``None``: the store keeps what it had). ``"all"`` is an
    interruption (Ctrl-C, a cancelled task) that lands after the one write call returned."""

    def __init__(self, fs: pafs.FileSystem, commit: str | None):
        self.fs, self.commit = fs, commit

    def __getattr__(self, name):
        return getattr(self.fs, name)

    @contextlib.contextmanager
    def open_output_stream(self, path):
        real = self.fs.open_output_stream(path) if self.commit else None
        commit = self.commit

        class Stream:
            def write(self, data):
                if real is not None:
                    real.write(memoryview(data)[: len(data) // 2] if commit == "half" else data)
                raise OSError("AWS Error NETWORK_CONNECTION during UploadPart: connection reset")

        try:
            yield Stream()
        finally:
            if real is not None:
                real.close()  # what pyarrow's own `with` block does on the error: the half is committed


@pytest.mark.ray
def test_a_write_that_fails_leaves_no_partial_object(s3, monkeypatch):
    """manifest.json, symbols.json, shards and the phoneme cache appear whole or not at all, also when
    the payload cannot be built (the error comes before any upload) or the upload itself fails."""
    folder = f"{s3}/failed"
    with pytest.raises(UnicodeEncodeError):  # a lone surrogate: not encodable
        write_text(f"{folder}/manifest.json", "ok \ud800")

    table = pa.table({"key": ["a", "b", "c"], "symbols": [["x"], ["y"], ["z"]]})

    def write_table_then_fail(table, where, **kwargs):  # a writer error after its first row group
        with pq.ParquetWriter(where, table.schema) as writer:
            writer.write_table(table.slice(0, 1))
            raise OSError("No space left on device")

    with monkeypatch.context() as m:
        m.setattr(pq, "write_table", write_table_then_fail)
        with pytest.raises(OSError, match="No space left"):
            _write_parquet(table, f"{folder}/.phonemes.parquet")
    assert _objects(folder) == {}
    with pytest.raises(pa.ArrowNotImplementedError, match="month_day_nano_interval"):  # no Parquet type
        _write_parquet(
            pa.table({"x": pa.array([(1, 2, 3)], pa.month_day_nano_interval())}), f"{folder}/x.parquet"
        )
    assert _objects(folder) == {}

    # The upload fails: half a payload it committed is deleted, an object it left untouched is kept,
    # and so is a whole payload committed before the error (a reader sees the old symbols.json, the
    # whole new one, or none, never half a new one).
    real = files.filesystem
    write_text(f"{folder}/symbols.json", "old")
    new = '{"new": "and longer than the old content"}'
    for name, commit, left in [
        ("manifest.json", "half", {"symbols.json": "old"}),
        ("symbols.json", None, {"symbols.json": "old"}),
        ("symbols.json", "half", {}),
        ("symbols.json", "all", {"symbols.json": new}),
    ]:

        def failing(location, commit=commit):
            fs, path = real(location)
            return FailingUploads(fs, commit), path

        with monkeypatch.context() as m:
            m.setattr(files, "filesystem", failing)
            with pytest.raises(OSError, match="NETWORK_CONNECTION"):
                write_text(f"{folder}/{name}", new)
        assert {k: files.read_text(f"{folder}/{k}") for k in _objects(folder)} == left, (name, commit)


@pytest.fixture(scope="module")
def small_manifest(tmp_path_factory):
    """A few real espeak utterances in two languages (audio paths absolute)."""
    src = make_demo_corpus(
        tmp_path_factory.mktemp("demo"), seed=0, languages=["en", "ar"], scale=0, progress=False
    )
    rows = [json.loads(line) for line in src.read_text().splitlines()]
    pick = []
    for lang, per_split in {"en": {"train": 5, "valid": 2}, "ar": {"train": 3, "valid": 2}}.items():
        for split, n in per_split.items():
            chosen = [r for r in rows if r["language"] == lang and r["split"] == split][:n]
            pick += [{**r, "audio": str(src.parent / r["audio"])} for r in chosen]
    out = tmp_path_factory.mktemp("small") / "manifest.jsonl"
    out.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in pick) + "\n")
    return out


@pytest.mark.ray
def test_prepare_to_s3_reruns_and_reads_back(s3, small_manifest, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a URI taken for a local path would show up here as ./s3:/...
    uri = f"{s3}/prep"
    manifest = prepare_corpus(read_manifest(small_manifest), uri, SETTINGS, progress=False)

    objects = _objects(uri)
    shards = [f"{lang}/part-0000{i}.parquet" for lang in ("ar", "en") for i in (0, 1)]
    caches = [f".phonemes/{lang}/batch-0000{i}.parquet" for lang in ("ar", "en") for i in (0, 1)]
    assert sorted(objects) == sorted(["manifest.json", "symbols.json", *shards, *caches])
    assert list(tmp_path.iterdir()) == []
    fs, root = filesystem(uri)
    with fs.open_input_stream(f"{root}/manifest.json") as f:
        assert json.loads(f.read()) == manifest
    assert {lang: e["utterances"] for lang, e in manifest["languages"].items()} == {
        "en": {"train": 5, "valid": 2},
        "ar": {"train": 3, "valid": 2},
    }
    assert manifest["languages"]["en"]["shards"] == ["en/part-00000.parquet", "en/part-00001.parquet"]
    assert manifest["last_run"] == {"phonemized": 12, "cached": 0, "shards_written": 4, "shards_reused": 0}

    # Same input again: every shard is found finished in the bucket, nothing is phonemized or rewritten.
    again = prepare_corpus(read_manifest(small_manifest), uri + "/", SETTINGS, progress=False)
    assert again["last_run"] == {"phonemized": 0, "cached": 12, "shards_written": 0, "shards_reused": 4}
    after = _objects(uri)
    assert {k: after[k].mtime for k in shards + caches} == {k: objects[k].mtime for k in shards + caches}
    assert ".vallex.lock" not in after  # each run's lock object was removed when it ended

    # A preparation running elsewhere holds the prefix (its lock object): this one is refused, naming it.
    from vallex.locks import LockError

    other = {"purpose": f"preparation of {uri}", "host": "gpu-node-7", "pid": 4242, "command": "prepare.py"}
    write_text(f"{uri}/.vallex.lock", json.dumps(other))
    with pytest.raises(
        LockError, match=r"preparation of s3://.* \(pid 4242 on host gpu-node-7.*delete s3://"
    ):
        prepare_corpus(read_manifest(small_manifest), uri, SETTINGS, progress=False)
    files.remove(f"{uri}/.vallex.lock")

    # Training reads the corpus from the same URI: the checks, the counts, validation, the mixed stream.
    corpus = PreparedCorpus.open(uri)
    assert corpus.root == uri and corpus.languages == ["ar", "en"]
    assert corpus.shards("en") == [f"{uri}/en/part-00000.parquet", f"{uri}/en/part-00001.parquet"]
    assert sum(corpus.shard_rows("en")) == 5 and corpus.counts("valid") == {"ar": 2, "en": 2}
    assert (
        corpus.read_split("ar", "valid", columns=["utt_id", "split"]).column("split").to_pylist()
        == ["valid"] * 2
    )
    ds = build_mixed_dataset(corpus, {"en": 0.5, "ar": 0.5}, num_rows=16, seed=0, window_rows=8)
    rows = list(ds.iter_rows())
    assert Counter(r["language"] for r in rows) == {"en": 8, "ar": 8}
    train_ids = {
        lang: set(corpus.read_split(lang, "train", columns=["utt_id"]).column("utt_id").to_pylist())
        for lang in corpus.languages
    }
    assert all(r["utt_id"] in train_ids[r["language"]] for r in rows)
    assert {r["utt_id"] for r in rows if r["language"] == "ar"} == train_ids["ar"]  # upsampled: all of it

    # The phoneme recognizer learns from the bucket's corpus, is saved beside it and found there.
    from vallex.eval.recognizer import RECOGNIZER_FILE, Recognizer, train_recognizer

    assert Recognizer.load(uri) is None
    tiny = {"dim": 16, "hidden": 16, "layers": 1, "threads": 1, "log_every": 0}
    rec = train_recognizer(corpus, steps=2, batch_size=4, **tiny)
    assert rec.save(uri) == f"{uri}/{RECOGNIZER_FILE}" and RECOGNIZER_FILE in _objects(uri)
    table = corpus.read_split("en", "valid", columns=["codes", "frames", "num_codebooks"]).to_pylist()
    codes = [codes_matrix(np.asarray(r["codes"]), r["frames"], r["num_codebooks"]) for r in table]
    loaded = Recognizer.load(uri)
    assert loaded.meta == rec.meta and loaded.transcribe(codes) == rec.transcribe(codes)


@pytest.mark.ray
def test_a_missing_or_unreachable_corpus_is_named(s3, monkeypatch):
    with pytest.raises(
        CorpusError, match=rf"{s3}/nothing/manifest.json not found; is {s3}/nothing a prepared"
    ):
        PreparedCorpus.open(f"{s3}/nothing")
    with pytest.raises(CorpusError, match=r"s3://no-such-bucket-vallex/x/manifest.json not found"):
        PreparedCorpus.open("s3://no-such-bucket-vallex/x")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: a network error
    with pytest.raises(
        CorpusError, match=rf"cannot read {s3}/prep/manifest.json \(.*NETWORK_CONNECTION.*credentials"
    ):
        PreparedCorpus.open(f"{s3}/prep")


def test_config_takes_a_prepared_uri_and_refuses_a_remote_output_dir(tmp_path):
    with pytest.raises(ConfigError, match=r"run.prepared_dir: 'ftp://host/x': unsupported scheme 'ftp'"):
        load_config(None, ["run.prepared_dir=ftp://host/x"])
    with pytest.raises(ConfigError, match=r"run.output_dir: must be a local .*run.prepared_dir=s3://"):
        load_config(None, ["run.output_dir=s3://bucket/run"])
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.prepared_dir=gs://bucket/prep/"])
    assert cfg.prepared_dir == "gs://bucket/prep"
    assert load_config(None, [f"run.output_dir={tmp_path}"]).prepared_dir == str(tmp_path / "prepare")


@pytest.mark.ray
def test_training_checkpoints_to_s3_and_resumes_from_them(s3, tmp_path, one_thread):
    from tests.train.test_train import SIZES, _cfg
    from vallex.data.synthetic import write_synthetic_corpus
    from vallex.train.metrics import read_metrics
    from vallex.train.trainer import train

    local = write_synthetic_corpus(tmp_path / "synthetic", SIZES, valid_per_language=5, frames=(15, 40))
    fs, root = filesystem(f"{s3}/synthetic")
    pafs.copy_files(str(local), root, destination_filesystem=fs)
    storage = f"{s3}/ray_results"
    run = (
        "run.name=s3",
        "train.num_workers=1",  # storage is what this test is about: one worker process per start
        f"run.prepared_dir={s3}/synthetic",
        f"train.storage_path={storage}",
        "train.keep_best_by=loss_mean",
        "train.intelligibility.samples=false",  # storage is what this test is about: no listening samples,
        "train.intelligibility.text_gain=false",  # no text gain (a second validation pass)
    )

    cfg = _cfg(tmp_path / "run", *run, "train.max_steps=3")
    report = train(cfg)
    first = read_metrics(cfg.train_dir / "metrics.jsonl")
    assert [r["step"] for r in first] == [1, 3]
    checkpoints = {key.split("/")[0] for key in _objects(f"{storage}/s3") if "/" in key}
    assert len(checkpoints) == 1 and report["checkpoint"] == f"{storage}/s3/{checkpoints.pop()}"
    # model.pt and best_model.pt are exported from the checkpoints in the bucket
    assert report["model_file"] == str(cfg.train_dir / "model.pt")
    assert report["best_checkpoint"]["path"] == report["checkpoint"]
    assert (cfg.train_dir / "best_model.pt").stat().st_size > 0

    # Same run name, more steps: resumes from the checkpoint in the bucket (step 3), not from step 0.
    cfg = _cfg(tmp_path / "run", *run, "train.max_steps=6")
    train(cfg)
    records = read_metrics(cfg.train_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 3, 6]
    assert records[:2] == first  # kept, not rewritten by a run that started over
    assert [r["step"] for r in records if "engine" in r] == [1, 6]  # each start's first record
    assert records[-1]["samples_seen"] == 1 * 4 * 6  # the mix counts came back with the checkpoint
