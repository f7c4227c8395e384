"""collate: shapes, padding and values round-trip against the shard rows they came from."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from vallex.data.collate import PAD_ID, collate, row_lengths
from vallex.data.corpus import PreparedCorpus
from vallex.data.mixing import build_mixed_dataset
from vallex.data.schema import codes_matrix
from vallex.data.synthetic import write_synthetic_corpus

Q = 4  # fewer codebooks than EnCodec's 8, so a wrong reshape cannot pass by accident


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> PreparedCorpus:
    root = write_synthetic_corpus(
        tmp_path_factory.mktemp("collate"),
        {"en": 40, "zh": 40},
        num_codebooks=Q,
        frames=(3, 30),
        phonemes=(1, 12),
    )
    return PreparedCorpus.open(root)


@pytest.fixture(scope="module")
def rows_by_id(corpus) -> dict[str, dict]:
    rows = {}
    for lang in corpus.languages:
        for shard in corpus.shards(lang):
            for row in pq.read_table(shard).to_pylist():
                rows[row["utt_id"]] = row
    return rows


def language_ids(corpus) -> dict[str, int]:
    return {lang: i for i, lang in enumerate(corpus.languages)}


def check_round_trip(batch, out, rows_by_id, ids):
    B = len(batch["utt_id"])
    assert out["phonemes"].dtype == out["codes"].dtype == torch.long
    assert out["codes"].shape == (B, int(out["code_lens"].max()), Q)
    assert out["phonemes"].shape == (B, int(out["phoneme_lens"].max()))
    for b, utt in enumerate(batch["utt_id"].tolist()):
        row = rows_by_id[utt]
        S, T = len(row["phonemes"]), row["frames"]
        assert out["phoneme_lens"][b] == S and out["code_lens"][b] == T
        assert out["phonemes"][b, :S].tolist() == row["phonemes"]
        assert (out["phonemes"][b, S:] == PAD_ID).all()
        want = codes_matrix(np.array(row["codes"]), T, Q).T  # [T, Q]
        assert np.array_equal(out["codes"][b, :T].numpy(), want)
        assert (out["codes"][b, T:] == PAD_ID).all()
        assert out["language"][b] == ids[row["language"]]


def test_collate_round_trips_a_real_ray_batch(ray_cluster, corpus, rows_by_id):
    ds = build_mixed_dataset(corpus, {"en": 1, "zh": 1}, num_rows=64, seed=0)
    ids = language_ids(corpus)
    batches = list(ds.iter_batches(batch_size=32))
    # What Ray Data gives for list columns: 1-D object arrays of numpy arrays.
    assert batches[0]["codes"].dtype == object and batches[0]["codes"][0].dtype == np.int16
    assert batches[0]["phonemes"][0].dtype == np.int32
    for batch in batches:
        check_round_trip(batch, collate(batch, ids, Q), rows_by_id, ids)
    assert len({int(i) for b in batches for i in collate(b, ids, Q)["language"]}) == 2


def _numpy_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    def column(name, dtype=None):
        if dtype is None:
            return np.array([r[name] for r in rows])
        out = np.empty(len(rows), dtype=object)
        out[:] = [np.array(r[name], dtype=dtype) for r in rows]
        return out

    return {
        "utt_id": column("utt_id"),
        "language": column("language"),
        "phonemes": column("phonemes", np.int32),
        "codes": column("codes", np.int16),
        "frames": column("frames").astype(np.int32),
    }


def test_collate_without_ray(corpus, rows_by_id):
    rows = [rows_by_id["en-000003"], rows_by_id["zh-000007"], rows_by_id["en-000011"]]
    batch = _numpy_batch(rows)
    ids = language_ids(corpus)
    check_round_trip(batch, collate(batch, ids, Q), rows_by_id, ids)


def test_unknown_language_is_named(corpus, rows_by_id):
    batch = _numpy_batch([rows_by_id["en-000001"], rows_by_id["zh-000001"]])
    with pytest.raises(ValueError, match=r"language\(s\) \['zh'\] with no language id; known: \{'en': 0\}"):
        collate(batch, {"en": 0}, Q)


def test_wrong_num_codebooks_names_the_utterance(corpus, rows_by_id):
    batch = _numpy_batch([rows_by_id["en-000001"]])
    with pytest.raises(
        ValueError, match=r"en-000001: codes hold \d+ values but frames=\d+ x num_codebooks=8"
    ):
        collate(batch, language_ids(corpus), 8)


def test_missing_column_is_named(corpus, rows_by_id):
    batch = _numpy_batch([rows_by_id["en-000001"]])
    del batch["frames"]
    with pytest.raises(KeyError, match=r"batch has no 'frames' column"):
        collate(batch, language_ids(corpus), Q)


def test_row_lengths_of_both_shapes_ray_gives():
    ragged = np.empty(3, dtype=object)
    ragged[:] = [np.arange(2), np.arange(5), np.arange(0)]
    assert row_lengths(ragged).tolist() == [2, 5, 0]
    # Every row the same length: Ray hands a 2-D array, whose rows are the columns' width, not 2 rows.
    assert row_lengths(np.zeros((4, 7), dtype=np.int32)).tolist() == [7, 7, 7, 7]
