"""Token-budget batching (data.max_tokens): the budget holds, padding drops, languages still mix, the
batch sequence is a function of the stream (same seed, same batches; a resume skips the same ones),
and no rank can run out of stream before the run's last step.

Measured here on the demo-like corpus below (languages with the demo's frame ranges, 1024-row pools,
budget 4800 positions, ~20 rows a batch): padding fell from 29% with fixed batches of 16 to 8%, and
languages per batch from 3.94 to 3.05 of 4 (sorting by length puts ar, the longest language, in
batches of its own more often). The synthetic phoneme counts are drawn apart from the frame counts, so
they leave more phoneme padding than real utterances, whose phonemes grow with their frames.
"""

from __future__ import annotations

import json
import shutil
from itertools import islice

import numpy as np
import pytest

from vallex.config import ConfigError, load_config
from vallex.data.batching import (
    PaddingStats,
    batch_lengths,
    cut_by_budget,
    padding_cost,
    stream_rows,
    train_batches,
    validation_indices,
)
from vallex.data.corpus import PreparedCorpus
from vallex.data.mixing import MixStats, build_mixed_dataset
from vallex.data.synthetic import write_synthetic_corpus
from vallex.train.metrics import format_record

# Lengths far apart in one corpus: fixed-size batches are mostly padding.
SKEWED = {"en": 600, "zh": 300, "ar": 40}
WEIGHTS = {"en": 0.4, "zh": 0.35, "ar": 0.25}
BUDGET = 3000

# The demo corpus's frame ranges per language (runs/demo/prepare: ar 163-261, en 100-219, fr 76-231,
# zh 95-250 frames; about 4-5 frames per phoneme).
DEMO_FRAMES = {"ar": (163, 261), "en": (100, 219), "fr": (76, 231), "zh": (95, 250)}


@pytest.fixture(scope="module")
def skewed(tmp_path_factory) -> PreparedCorpus:
    root = write_synthetic_corpus(
        tmp_path_factory.mktemp("skewed"), SKEWED, frames=(10, 300), phonemes=(5, 15), rows_per_shard=200
    )
    return PreparedCorpus.open(root)


def demo_like_corpus(root, sizes: dict[str, int]) -> PreparedCorpus:
    """One synthetic corpus whose languages have the demo's different frame ranges (write_synthetic_corpus
    takes one range for all: write each language alone, then merge the manifests)."""
    manifest = None
    for lang, n in sizes.items():
        lo, hi = DEMO_FRAMES[lang]
        part = write_synthetic_corpus(
            root / f"_{lang}", {lang: n}, frames=(lo, hi), phonemes=(lo // 5, hi // 4), rows_per_shard=200
        )
        shutil.move(part / lang, root / lang)
        one = json.loads((part / "manifest.json").read_text())
        if manifest is None:
            manifest = one
            shutil.copy(part / "symbols.json", root / "symbols.json")
        else:
            manifest["languages"].update(one["languages"])
        shutil.rmtree(part)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return PreparedCorpus.open(root)


def cost(batch) -> int:
    return padding_cost(*batch_lengths(batch))[1]


def ids(batches) -> list[tuple[str, ...]]:
    return [tuple(b["utt_id"].tolist()) for b in batches]


def drain(stream) -> list[dict]:
    """Every batch of a token-budget stream, which ends by raising rather than starting another pass."""
    out = []
    with pytest.raises(RuntimeError, match=r"rank 0: the training stream ran out after \d+ token-budget"):
        for b in stream:
            out.append(b)
    return out


def padding_of(batches) -> float:
    stats = PaddingStats()
    for b in batches:
        stats.update(b)
    return stats.fraction


# --------------------------------------------------------------------------------------------------
# the cut (no Ray)
# --------------------------------------------------------------------------------------------------


def test_cut_never_exceeds_the_budget_and_closes_a_batch_only_when_the_next_row_does_not_fit():
    rng = np.random.default_rng(0)
    S, T = rng.integers(1, 80, 2000), rng.integers(5, 900, 2000)
    order = np.argsort(T, kind="stable")
    cuts = cut_by_budget(S, T, order, max_tokens=5000, max_rows=12)
    assert np.array_equal(np.concatenate(cuts), order)  # every row once, in order
    for k, idx in enumerate(cuts):
        assert len(idx) <= 12 and len(idx) * (S[idx].max() + T[idx].max()) <= 5000
        if k + 1 < len(cuts):  # greedy: the next row would have broken the budget or the row cap
            grown = np.append(idx, cuts[k + 1][0])
            assert len(grown) > 12 or len(grown) * (S[grown].max() + T[grown].max()) > 5000
    # Both limits bind somewhere: short rows hit the 12-row cap, long ones the budget.
    assert max(len(c) for c in cuts) == 12 and min(len(c) for c in cuts[:-1]) < 12


def test_validation_batches_fit_the_budget_and_cover_every_row():
    rng = np.random.default_rng(1)
    n = 50
    rows = {
        "phonemes": np.array([np.zeros(k, np.int32) for k in rng.integers(1, 30, n)], dtype=object),
        "frames": rng.integers(10, 400, n).astype(np.int32),
        "utt_id": np.array([f"v{i}" for i in range(n)]),
    }
    S, T = batch_lengths(rows)
    token = validation_indices(rows, batch_size=8, max_tokens=1200)
    assert sorted(np.concatenate(token).tolist()) == list(range(n))
    assert all(len(i) <= 8 and len(i) * (S[i].max() + T[i].max()) <= 1200 for i in token)
    assert [len(i) for i in validation_indices(rows, batch_size=8, max_tokens=0)] == [8] * 6 + [2]
    with pytest.raises(
        ValueError, match=r"v\d+: \d+ frames \+ \d+ phonemes = \d+ positions.*data.max_tokens"
    ):
        validation_indices(rows, batch_size=8, max_tokens=300)


def test_padding_stats_and_the_record_line():
    stats = PaddingStats()
    assert stats.fraction is None
    stats.update({"phonemes": np.array([np.zeros(2), np.zeros(4)], dtype=object), "frames": np.array([6, 8])})
    # real 2+6 + 4+8 = 20; padded 2 rows x (4 + 8) = 24
    assert (stats.real, stats.padded) == (20, 24) and stats.fraction == pytest.approx(4 / 24)
    stats.reset()
    assert stats.fraction is None
    rec = {"step": 3, "train_loss": 1.0, "valid": {}, "languages_per_batch": 2.5, "padding_fraction": 0.123}
    assert "2.5 lang/batch, 12% padding" in format_record(rec, 10)
    assert "- padding" in format_record({**rec, "padding_fraction": None}, 10)


def test_config_key_is_checked():
    assert load_config(None, ["data.max_tokens=4000"]).data.max_tokens == 4000
    with pytest.raises(ConfigError, match=r"data.max_tokens: must be >= 0"):
        load_config(None, ["data.max_tokens=-1"])
    with pytest.raises(ConfigError, match=r"data.bucket_rows: must be >= 1"):
        load_config(None, ["data.bucket_rows=0"])


# --------------------------------------------------------------------------------------------------
# the mixed stream (Ray)
# --------------------------------------------------------------------------------------------------


def test_budget_holds_padding_drops_and_no_row_is_lost(ray_cluster, skewed):
    ds = build_mixed_dataset(skewed, WEIGHTS, num_rows=3000, seed=0, window_rows=256)
    fixed = list(islice(train_batches(ds, batch_size=16), 150))
    token = drain(train_batches(ds, batch_size=64, max_tokens=BUDGET, bucket_rows=512))

    assert all(len(b["frames"]) <= 64 and cost(b) <= BUDGET for b in token)
    # Full batches, not a trivially padding-free one row per batch: most of the budget is used.
    assert np.mean([cost(b) for b in token]) > 0.85 * BUDGET
    fixed_pad, token_pad = padding_of(fixed), padding_of(token)
    # ~44% -> ~6% measured; the synthetic phoneme counts ignore the frame counts, so they pad more than
    # real ones would.
    assert fixed_pad > 0.35 and token_pad < 0.09 and token_pad < fixed_pad / 4, (fixed_pad, token_pad)
    # The batches hold exactly the rows of the stream's first 5 whole pools (the last 440 rows fill none).
    stream = [u for b in ds.iter_batches(batch_size=500) for u in b["utt_id"].tolist()]
    assert sorted(u for b in token for u in b["utt_id"].tolist()) == sorted(stream[: 5 * 512])
    mix = MixStats()
    for b in token:
        mix.update(b)
    assert mix.mean_languages_per_batch > 2.5  # of 3: lengths do not depend on the language here


def test_same_seed_same_batches_and_resume_skips_the_same_ones(ray_cluster, skewed):
    ds = build_mixed_dataset(skewed, WEIGHTS, num_rows=2000, seed=0, window_rows=256)

    def run(skip=0, seed=0, rank=0, shuffle_buffer=128):
        stream = train_batches(
            ds,
            batch_size=64,
            max_tokens=BUDGET,
            bucket_rows=256,
            shuffle_buffer=shuffle_buffer,
            seed=seed,
            rank=rank,
            skip=skip,
        )
        return ids(islice(stream, 40))

    first = run()
    sizes = {len(b) for b in first}
    assert len(sizes) > 3  # dynamic batch sizes, so a skip by rows would land elsewhere
    assert run() == first
    assert run(seed=1) != first and run(rank=1) != first
    # Without a shuffle buffer the rows are the same for every seed: the batch order is the bucketing's.
    unshuffled = [run(seed=seed, shuffle_buffer=0) for seed in (0, 0, 1)]
    assert unshuffled[0] == unshuffled[1] != unshuffled[2]
    # A restart after 13 batches skips exactly those 13 and continues with the 14th.
    assert run(skip=13)[:27] == first[13:]
    # Fixed-size batches resume the same way.
    fixed = ids(islice(train_batches(ds, batch_size=16, shuffle_buffer=128), 30))
    assert ids(islice(train_batches(ds, batch_size=16, shuffle_buffer=128, skip=7), 23)) == fixed[7:]


def test_demo_like_languages_still_share_batches(ray_cluster, tmp_path):
    corpus = demo_like_corpus(tmp_path, {"ar": 40, "en": 300, "fr": 150, "zh": 200})
    weights = {"ar": 0.2, "en": 0.3, "fr": 0.25, "zh": 0.25}
    ds = build_mixed_dataset(corpus, weights, num_rows=4200, seed=0, window_rows=512)
    fixed = list(islice(train_batches(ds, batch_size=16, shuffle_buffer=256), 250))
    token = drain(train_batches(ds, batch_size=64, max_tokens=16 * 300, bucket_rows=1024, shuffle_buffer=256))
    per_batch = {}
    for name, batches in (("fixed", fixed), ("token", token)):
        mix = MixStats()
        for b in batches:
            mix.update(b)
        per_batch[name] = mix.mean_languages_per_batch
    assert per_batch["fixed"] > 3.7
    # Bucketing groups by length, and ar (the longest) overlaps the others less: fewer languages per
    # batch, but still well above one.
    assert 2.5 < per_batch["token"] < per_batch["fixed"], per_batch
    assert padding_of(fixed) > 0.2 and padding_of(token) < min(0.12, padding_of(fixed) / 2.5)


def test_a_row_longer_than_the_budget_is_named(ray_cluster, skewed):
    ds = build_mixed_dataset(skewed, WEIGHTS, num_rows=600, seed=0)
    with pytest.raises(
        ValueError,
        match=r"(en|zh|ar)-\d{6}: \d+ frames \+ \d+ phonemes = \d+ positions, more than "
        r"data.max_tokens=200 allows.*raise data.max_tokens to at least \d+",
    ):
        next(train_batches(ds, batch_size=8, max_tokens=200, bucket_rows=100))


def test_the_stream_is_long_enough_for_every_rank(ray_cluster, skewed):
    """Worst case for running out: every batch holds the row cap (short rows, a large budget). The
    trainer's stream_rows covers max_steps x grad_accum batches on each rank of a streaming_split;
    without the bucket-pool term it does not."""
    import ray

    workers, batch_size, bucket_rows, batches_per_rank = 2, 8, 128, 20
    budget_rows = batches_per_rank * batch_size * workers
    kw = {"batch_size": batch_size, "max_tokens": 10**6, "bucket_rows": bucket_rows, "shuffle_buffer": 64}

    @ray.remote(num_cpus=0.5)
    def count(split, rank):  # one process per rank, as Ray Train runs them
        from vallex.data.batching import train_batches

        n = 0
        try:
            for _ in train_batches(split, rank=rank, **kw):
                n += 1
        except RuntimeError as e:
            assert "ran out" in str(e)
        return n

    def per_rank(num_rows):
        ds = build_mixed_dataset(skewed, WEIGHTS, num_rows=num_rows, seed=0, window_rows=64)
        splits = ds.streaming_split(workers, equal=True)
        return ray.get([count.remote(s, r) for r, s in enumerate(splits)])

    enough = per_rank(stream_rows(budget_rows, batch_size, workers, 1, bucket_rows))
    assert min(enough) >= batches_per_rank, enough
    short = per_rank(stream_rows(budget_rows, batch_size, workers, 0, bucket_rows))  # no pool term
    assert min(short) < batches_per_rank, short


# --------------------------------------------------------------------------------------------------
# training (Ray Train + DeepSpeed)
# --------------------------------------------------------------------------------------------------


# A real two-worker training run with a token budget, and its resume, is the tracked run of
# tests/train/test_tracking.py (one pair of Ray Train starts serves both).
