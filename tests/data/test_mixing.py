"""The prepared-corpus checks and the mixed training stream: ratios, mixing within batches, determinism.

Measured on the synthetic corpus below (en 2000 / zh 500 / ar 40 train rows, ar 50x smaller than en
and upsampled ~38x for a 0.25 share of 6000 rows):

- ``planned``: realized fractions exactly .40/.35/.25 (every window is exact), ~3.0 languages per
  batch of 16 with no shuffle buffer; each ar utterance drawn 37 or 38 times.
- ``mix`` (``Dataset.mix``, 32-row blocks, shuffle buffer 256): fractions within 0.001; 3.0
  languages per batch of 16 only thanks to the shuffle buffer (one block is one language).

Determinism, as observed on Ray 2.58 and asserted below: with ``preserve_order`` (the default of
``build_mixed_dataset``) the same seed gives the same sequence of utt_ids, run after run; without it
the multiset of rows is the same but the order is not (tasks that finish early overtake).
"""

from __future__ import annotations

import json
import math
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vallex.config import ConfigError, config_from_dict
from vallex.data import mixing
from vallex.data.corpus import CorpusError, PreparedCorpus, read_split_rows, split_source
from vallex.data.mixing import MixStats, build_mixed_dataset, plan_mix, window_counts
from vallex.data.schema import SHARD_SCHEMA
from vallex.data.synthetic import write_synthetic_corpus

SIZES = {"en": 2000, "zh": 500, "ar": 40}
WEIGHTS = {"en": 0.40, "zh": 0.35, "ar": 0.25}
NUM_ROWS = 6000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> PreparedCorpus:
    root = write_synthetic_corpus(tmp_path_factory.mktemp("corpus"), SIZES, rows_per_shard=300, seed=1)
    return PreparedCorpus.open(root)


def utt_ids(ds, **iter_kwargs) -> list[str]:
    return [u for b in ds.iter_batches(batch_size=16, **iter_kwargs) for u in b["utt_id"].tolist()]


# --------------------------------------------------------------------------------------------------
# corpus
# --------------------------------------------------------------------------------------------------


def test_synthetic_corpus_opens_with_manifest_counts(corpus):
    assert corpus.languages == ["ar", "en", "zh"]
    assert corpus.counts("train") == SIZES
    assert corpus.counts("valid") == {"ar": 4, "en": 4, "zh": 4}
    assert len(corpus.shards("en")) == 7  # 2004 rows at 300 per shard
    assert all(p.startswith(str(corpus.root)) and p.endswith(".parquet") for p in corpus.shards("en"))
    assert sum(corpus.shard_rows("en", "train")) == 2000
    assert corpus.num_codebooks == 8 and corpus.num_symbols == 40 and corpus.symbols[0] == "<pad>"
    valid = corpus.read_split("zh", "valid")
    assert valid.num_rows == 4 and set(valid["split"].to_pylist()) == {"valid"}
    assert valid.schema.equals(SHARD_SCHEMA, check_metadata=False)


def test_missing_manifest_says_how_to_make_one(tmp_path):
    with pytest.raises(
        CorpusError, match=r"manifest.json not found; is .* a prepared corpus\? Run ray_jobs/prepare.py"
    ):
        PreparedCorpus.open(tmp_path)


def test_unknown_language_lists_the_known_ones(corpus):
    with pytest.raises(CorpusError, match=r"no language 'fr'; this corpus has \['ar', 'en', 'zh'\]"):
        corpus.shards("fr")


def _copy(tmp_path) -> PreparedCorpus:
    return PreparedCorpus.open(write_synthetic_corpus(tmp_path / "c", {"en": 10, "zh": 10}))


def test_missing_shard_is_named(tmp_path):
    c = _copy(tmp_path)
    (Path(c.root) / "zh" / "part-00000.parquet").unlink()
    with pytest.raises(
        CorpusError, match=r"languages.zh lists .*zh/part-00000.parquet, which does not exist"
    ):
        PreparedCorpus.open(c.root)


def test_shard_schema_mismatch_names_shard_and_column(tmp_path):
    c = _copy(tmp_path)
    shard = Path(c.root) / "en" / "part-00000.parquet"
    table = pq.read_table(shard)
    # codes written as int32 instead of int16: a plausible bug in a preparation script
    bad = table.set_column(
        table.schema.get_field_index("codes"), "codes", table["codes"].cast(pa.list_(pa.int32()))
    )
    pq.write_table(bad, shard)
    with pytest.raises(
        ValueError, match=r"en/part-00000.parquet: not a vallex shard \(column 'codes' is list<"
    ):
        PreparedCorpus.open(c.root)


def test_symbols_version_mismatch(tmp_path):
    c = _copy(tmp_path)
    table = json.loads((Path(c.root) / "symbols.json").read_text())
    table["version"] += 1
    (Path(c.root) / "symbols.json").write_text(json.dumps(table))
    with pytest.raises(CorpusError, match=r"symbols_version 1 but .*symbols.json is version 2"):
        PreparedCorpus.open(c.root)


def test_symbol_table_edited_reordered_or_truncated_is_refused_when_the_corpus_opens(tmp_path):
    """What training opens (PreparedCorpus.open, before any Ray work): a symbols.json whose ids would
    mean something else than in the shards is refused, naming both files; one an interrupted
    preparation extended (append-only) opens as the manifest committed it."""
    from vallex.text.symbols import symbols_fingerprint

    c = _copy(tmp_path)
    path = Path(c.root) / "symbols.json"
    table = json.loads(path.read_text())
    symbols, version = table["symbols"], table["version"]
    reordered = symbols[:4] + symbols[4:][::-1]
    cases = {
        "reordered": {"version": version, "symbols": reordered},
        "reordered, stale fingerprint": {
            "version": version,
            "symbols": reordered,
            "fingerprint": symbols_fingerprint(symbols),
        },
        "reordered, fingerprint recomputed": {
            "version": version,
            "symbols": reordered,
            "fingerprint": symbols_fingerprint(reordered),
        },
        "truncated": {"version": version, "symbols": symbols[:-5]},
        "another corpus's": {"version": version + 1, "symbols": reordered},
    }
    for name, content in cases.items():
        path.write_text(json.dumps(content))
        with pytest.raises(CorpusError) as err:
            PreparedCorpus.open(c.root)
        message = str(err.value)
        assert str(path) in message and "manifest.json" in message, (name, message)
        assert "restore" in message, (name, message)

    # An interrupted preparation saved a grown table (its version bumped) and not its manifest.
    manifest_path = Path(c.root) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["num_symbols"] = len(symbols)
    manifest_path.write_text(json.dumps(manifest))
    path.write_text(json.dumps({"version": version + 1, "symbols": [*symbols, "new1", "new2"]}))
    opened = PreparedCorpus.open(c.root)
    assert opened.symbols == symbols and opened.num_symbols == len(symbols)


def test_a_language_without_validation_rows_is_refused_when_the_corpus_opens(tmp_path):
    root = write_synthetic_corpus(tmp_path / "c", {"en": 10, "zh": 10}, valid_per_language=0)
    with pytest.raises(CorpusError, match=r"language 'en' has no validation utterances.*split=valid"):
        PreparedCorpus.open(root)


def test_manifest_count_that_disagrees_with_the_shards(tmp_path):
    c = _copy(tmp_path)
    manifest = json.loads((Path(c.root) / "manifest.json").read_text())
    manifest["languages"]["en"]["utterances"]["train"] = 11
    (Path(c.root) / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorpusError, match=r"languages.en.utterances.train is 11 but its shards hold 10"):
        PreparedCorpus.open(c.root).shard_rows("en")


# --------------------------------------------------------------------------------------------------
# plan (no Ray)
# --------------------------------------------------------------------------------------------------


def test_window_counts_are_exact_at_every_window_boundary():
    weights = {"a": 0.5, "b": 0.3, "c": 0.1999, "d": 0.0001}  # d gets < 1 row per window
    counts = window_counts(weights, num_rows=100_003, window_rows=1000)
    assert counts.min() >= 0
    assert counts.sum(axis=1).tolist() == [1000] * 100 + [3]
    cumulative = counts.cumsum(axis=0)
    ends = cumulative.sum(axis=1)[:, None]
    target = ends * np.array(list(weights.values()))
    assert np.abs(cumulative - target).max() < 1.0 + 1e-9  # within one row of the ratio, always


def test_plan_upsamples_a_small_language_by_whole_reshuffled_passes(corpus):
    windows = plan_mix(corpus, WEIGHTS, num_rows=NUM_ROWS, seed=0, window_rows=512)
    totals = Counter()
    for w in windows:
        totals.update(w.counts())
    assert dict(totals) == {"en": 2400, "zh": 2100, "ar": 1500}
    ar_passes = {p.seed[2] for w in windows for p in w.pieces if p.lang == "ar"}
    assert ar_passes == set(range(38))  # 1500 rows / 40 per pass


# --------------------------------------------------------------------------------------------------
# the mixed stream (Ray)
# --------------------------------------------------------------------------------------------------


def test_planned_mix_holds_ratios_and_mixes_every_batch(ray_cluster, corpus):
    ds = build_mixed_dataset(corpus, WEIGHTS, num_rows=NUM_ROWS, seed=0, window_rows=512)
    stats = MixStats()
    ids = Counter()
    for batch in ds.iter_batches(batch_size=16):
        stats.update(batch)
        ids.update(batch["utt_id"].tolist())
        assert set(batch["split"].tolist()) == {"train"}
    assert stats.rows == NUM_ROWS
    assert stats.max_abs_error(WEIGHTS) < 0.01
    assert stats.fractions() == pytest.approx(WEIGHTS, abs=1e-9)  # exact by construction
    assert stats.mean_languages_per_batch > 2.8  # of 3; no shuffle buffer needed
    # Upsampling repeats every ar utterance about equally (whole passes), not a few of them often.
    ar_draws = [n for u, n in ids.items() if u.startswith("ar-")]
    assert len(ar_draws) == 40 and min(ar_draws) >= 37 and max(ar_draws) <= 38


def test_ray_mix_baseline_holds_ratios_with_a_shuffle_buffer(ray_cluster, corpus):
    ds = build_mixed_dataset(corpus, WEIGHTS, num_rows=NUM_ROWS, seed=0, block_rows=32, strategy="mix")
    stats = MixStats()
    for batch in ds.iter_batches(batch_size=16, local_shuffle_buffer_size=256, local_shuffle_seed=0):
        stats.update(batch)
    assert stats.rows == NUM_ROWS
    assert stats.max_abs_error(WEIGHTS) < 0.01
    assert stats.mean_languages_per_batch > 2.5


def test_same_seed_same_sequence_and_resume(ray_cluster, corpus):
    def run(seed, **kw):
        return utt_ids(build_mixed_dataset(corpus, WEIGHTS, num_rows=3000, seed=seed, window_rows=256, **kw))

    first = run(0)
    assert run(0) == first
    assert run(1) != first
    assert run(0, start_row=1000) == first[1000:]  # resume continues the same run
    # Without preserve_order only the multiset is fixed (tasks may finish out of order).
    assert sorted(run(0, preserve_order=False)) == sorted(first)


def test_columns_are_projected_but_language_is_kept(ray_cluster, corpus):
    ds = build_mixed_dataset(corpus, WEIGHTS, num_rows=100, seed=0, columns=["codes", "frames"])
    batch = next(iter(ds.iter_batches(batch_size=100)))
    assert sorted(batch) == ["codes", "frames", "language"]
    assert len(batch["language"]) == 100


def test_bad_mixing_arguments(corpus):
    with pytest.raises(
        ValueError, match=r"weights name \['fr'\], which .* does not hold; it has \['ar', 'en', 'zh'\]"
    ):
        build_mixed_dataset(corpus, {"fr": 1.0}, num_rows=10, seed=0)
    with pytest.raises(ValueError, match=r"select no language"):
        build_mixed_dataset(corpus, {"en": 0.0}, num_rows=10, seed=0)
    with pytest.raises(ValueError, match=r"num_rows must be >= 1"):
        build_mixed_dataset(corpus, WEIGHTS, num_rows=0, seed=0)
    with pytest.raises(ValueError, match=r"strategy 'mux' is not one of"):
        build_mixed_dataset(corpus, WEIGHTS, num_rows=10, seed=0, strategy="mux")


def test_mix_stats_arithmetic():
    stats = MixStats()
    stats.update({"language": np.array(["en", "en", "zh", "en"], dtype=object)})
    stats.update(["ar", "ar", "ar", "ar"])
    assert stats.rows == 8 and stats.batches == 2
    assert stats.fractions() == {"ar": 0.5, "en": 0.375, "zh": 0.125}
    assert stats.mean_languages_per_batch == 1.5
    assert stats.max_abs_error({"en": 1, "zh": 1, "ar": 2}) == pytest.approx(0.125)


# --------------------------------------------------------------------------------------------------
# growth: row-group reads, a plan computed on demand, validation read per worker (issue 18)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grouped(tmp_path_factory) -> PreparedCorpus:
    """Eight skewed languages in shards of 300 rows written as 16-row Parquet row groups."""
    sizes = {"a": 1500, "b": 700, "c": 300, "d": 120, "e": 60, "f": 30, "g": 12, "h": 5}
    root = write_synthetic_corpus(
        tmp_path_factory.mktemp("grouped"), sizes, rows_per_shard=300, row_group_rows=16, seed=2
    )
    return PreparedCorpus.open(root)


GROUPED_WEIGHTS = {"a": 0.3, "b": 0.2, "c": 0.15, "d": 0.1, "e": 0.1, "f": 0.08, "g": 0.05, "h": 0.02}


def read_in_process(corpus, weights, monkeypatch, **kw) -> tuple[list[pa.Table], int]:
    """The planned stream's blocks, from its read tasks run here (what Ray Data calls), and the rows
    every Parquet read returned (whole-file reads and row-group reads alike)."""
    rows_read = [0]
    read_table, read_group = pq.read_table, pq.ParquetFile.read_row_group

    def counted_table(*a, **k):
        table = read_table(*a, **k)
        rows_read[0] += table.num_rows
        return table

    def counted_group(self, *a, **k):
        table = read_group(self, *a, **k)
        rows_read[0] += table.num_rows
        return table

    monkeypatch.setattr(pq, "read_table", counted_table)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counted_group)
    source = mixing.planned_datasource(corpus, weights, seed=0, **kw)
    blocks = [b for task in source.get_read_tasks(1) for b in task()]
    monkeypatch.undo()
    return blocks, rows_read[0]


def test_windows_read_only_the_row_groups_they_need_and_keep_exact_ratios(grouped, monkeypatch):
    blocks, rows_read = read_in_process(grouped, GROUPED_WEIGHTS, monkeypatch, num_rows=8000, window_rows=256)
    table = pa.concat_tables(blocks)
    assert [b.num_rows for b in blocks] == [256] * 31 + [64]  # one block per window
    assert set(table["split"].to_pylist()) == {"train"}
    stats = MixStats()
    stats.update(table["language"].to_numpy(zero_copy_only=False))
    assert stats.fractions() == pytest.approx(GROUPED_WEIGHTS, abs=1e-9)
    # Upsampled by whole passes: h's 5 train rows are each drawn 160 / 5 = 32 times.
    h_draws = Counter(u for u in table["utt_id"].to_pylist() if u.startswith("h-"))
    assert len(h_draws) == 5 and set(h_draws.values()) == {32}
    # Whole shards per window would read ~8 languages x 300 rows per 256 delivered (~9x); row groups
    # read once per visit keep it near 1x (valid rows and the groups at task edges are the rest).
    assert rows_read / table.num_rows < 1.5


def test_row_groups_keep_determinism_and_exact_resume(grouped, monkeypatch):
    def ids(**kw):
        blocks, _ = read_in_process(
            grouped, GROUPED_WEIGHTS, monkeypatch, num_rows=5000, window_rows=200, **kw
        )
        return [u for b in blocks for u in b["utt_id"].to_pylist()]

    first = ids()
    assert ids() == first
    for start in (1, 1999, 3203):  # inside a window, inside a read task, in a later task
        assert ids(start_row=start) == first[start:]
    eager = plan_mix(grouped, GROUPED_WEIGHTS, num_rows=5000, seed=0, window_rows=200)
    assert [sum(w.counts().values()) for w in eager] == [200] * 25


def test_the_plan_is_described_in_o_languages_not_o_run(grouped):
    def size(num_rows):
        source = mixing.planned_datasource(
            grouped, GROUPED_WEIGHTS, num_rows=num_rows, seed=0, window_rows=256
        )
        return len(pickle.dumps(source))

    assert size(10**9) - size(10**4) < 16  # a 10^9-row plan holds no more than a 10^4-row one
    # A read task is described by its first window and the rows taken so far: O(languages).
    source = mixing.planned_datasource(grouped, GROUPED_WEIGHTS, num_rows=10**5, seed=0, window_rows=256)
    tasks = source.get_read_tasks(1)
    assert len(tasks) == math.ceil(math.ceil(10**5 / 256) / mixing.TASK_WINDOWS)
    assert max(len(pickle.dumps(t)) for t in tasks) - min(len(pickle.dumps(t)) for t in tasks) < 64
    # Window k on demand equals window k of the whole walked plan.
    plan = source._plan
    k, _, _, taken = next(plan.walk(300, 301))
    on_demand = next(plan.windows(k, k + 1, taken))
    assert (
        on_demand.counts()
        == plan_mix(grouped, GROUPED_WEIGHTS, num_rows=10**6, seed=0, window_rows=256, start_row=3000 * 256)[
            0
        ].counts()
    )


def test_workers_read_the_capped_validation_rows_from_the_shards(tmp_path):
    root = write_synthetic_corpus(
        tmp_path, {"en": 700, "zh": 90}, valid_per_language=37, rows_per_shard=100, row_group_rows=16
    )
    corpus = PreparedCorpus.open(root)
    for cap in (0, 10, 1000):
        source = split_source(corpus, ["en", "zh"], "valid", cap)
        assert json.loads(json.dumps(source)) == source  # paths and numbers only travel to workers
        read = read_split_rows(source)
        for lang in ("en", "zh"):
            full = corpus.read_split(lang, "valid")
            # The same rows, in the same order, as the driver-side read (capped).
            assert read[lang].equals(full.slice(0, cap) if cap else full)
    assert read_split_rows(split_source(corpus, ["zh"], "valid", 10))["zh"].num_rows == 10
    with pytest.raises(ValueError, match=r"max_rows must be >= 0"):
        split_source(corpus, ["en"], "valid", -1)
    with pytest.raises(ConfigError, match=r"data.valid_max_rows"):
        config_from_dict({"data": {"valid_max_rows": -1}})


def test_prepare_writes_shards_in_row_groups_the_mixer_can_read_alone(tmp_path):
    from vallex.data.prepare import _write_parquet
    from vallex.data.schema import ROW_GROUP_ROWS

    table = pa.table({"x": list(range(2 * ROW_GROUP_ROWS + 5))})
    _write_parquet(table, str(tmp_path / "part-00000.parquet"), ROW_GROUP_ROWS)
    meta = pq.ParquetFile(tmp_path / "part-00000.parquet").metadata
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [
        ROW_GROUP_ROWS,
        ROW_GROUP_ROWS,
        5,
    ]
