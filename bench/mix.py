"""The mixed multilingual loader against a raw pyarrow read and against what training consumes.

    .venv/bin/python bench/mix.py              # 25k synthetic utterances of 300-500 frames, 30k mixed rows
    .venv/bin/python bench/mix.py --rows 10000

One command, same shards for every line:
  - raw pyarrow read + split filter of every shard (the baseline, rows/s and frames/s);
  - the planned mixed stream (vallex's default) and Ray's Dataset.mix, iterated in batches of 16 with
    the training loop's local shuffle buffer: rows/s, frames/s and the ratio to raw (goal >= 0.3x);
  - the ratio of the loader's rows/s to the rows/s one training step of the `small` model consumes on
    this machine (goal >= 20x: data is never the bottleneck);
  - the realized-ratio error against the weights, languages per batch, and the padding fraction of
    collated batches (positions of the model's [phonemes ; frames] sequence that are padding; the
    frames-only figure in brackets);
  - the planned stream again with token-budget batching (data.max_tokens = 16 x the longest row, the
    padded size of the worst fixed batch of 16, so the same peak memory; at most 64 rows, 1024-row
    bucket pools): rows/s, padding, languages and rows per batch.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from vallex.data.batching import PaddingStats, token_batches
from vallex.data.collate import collate
from vallex.data.corpus import PreparedCorpus
from vallex.data.mixing import MixStats, build_mixed_dataset
from vallex.data.synthetic import write_synthetic_corpus

WEIGHTS = {"en": 0.4, "zh": 0.35, "ar": 0.25}
FRAMES, PHONEMES = (300, 500), (5, 20)  # the synthetic corpus's length ranges
MAX_TOKENS = 16 * (FRAMES[1] + PHONEMES[1])  # a fixed batch of 16 costs at most this many positions
BUCKET_ROWS, MAX_ROWS = 1024, 64
SIZES = {"en": 20000, "zh": 5000, "ar": 400}  # ar: 50x smaller than en, upsampled ~19x


def raw_read(corpus: PreparedCorpus) -> tuple[float, float]:
    t0, rows, frames = time.perf_counter(), 0, 0
    for lang in corpus.languages:
        for shard in corpus.shards(lang):
            table = pq.read_table(shard, filters=pc.field("split") == "train")
            rows += table.num_rows
            frames += int(pc.sum(table["frames"]).as_py())
    dt = time.perf_counter() - t0
    return rows / dt, frames / dt


def loader(corpus: PreparedCorpus, rows: int, max_tokens: int = 0, **kw) -> dict:
    ids = {lang: i for i, lang in enumerate(corpus.languages)}
    ds = build_mixed_dataset(corpus, WEIGHTS, num_rows=rows, seed=0, **kw)
    stats, padding, frames, padded = MixStats(), PaddingStats(), 0, 0
    shuffle = {"batch_format": "numpy", "local_shuffle_buffer_size": 256, "local_shuffle_seed": 0}
    t0 = time.perf_counter()
    if max_tokens:  # what vallex.data.batching.train_batches does, without its end-of-stream error
        pools = ds.iter_batches(batch_size=BUCKET_ROWS, drop_last=True, **shuffle)
        batches = token_batches(pools, max_tokens, MAX_ROWS)
    else:
        batches = ds.iter_batches(batch_size=16, **shuffle)
    for b in batches:
        stats.update(b)
        padding.update(b)
        frames += int(b["frames"].sum())
        padded += int(b["frames"].max()) * len(b["frames"])
    dt = time.perf_counter() - t0
    batch = collate(b, ids, corpus.num_codebooks)  # last batch: check the loader's output collates
    assert batch["codes"].shape[0] == len(b["frames"])
    return {
        "rows_per_s": stats.rows / dt,
        "frames_per_s": frames / dt,
        "max_err": stats.max_abs_error(WEIGHTS),
        "langs_per_batch": stats.mean_languages_per_batch,
        "rows_per_batch": stats.rows / stats.batches,
        "padding": padding.fraction,
        "frame_padding": 1 - frames / padded,
        "fractions": stats.fractions(),
    }


def train_rows_per_s(corpus: PreparedCorpus, steps: int = 4) -> float:
    """Rows/s one optimizer step of the `small` model consumes (batch 16 of these utterances)."""
    from vallex.model.vallex import build_model

    ids = {lang: i for i, lang in enumerate(corpus.languages)}
    table = corpus.read_split("en", "train").slice(0, 16)
    batch = collate({c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}, ids, 8)
    model = build_model("small", num_phonemes=corpus.num_symbols, num_languages=len(ids))
    opt = torch.optim.AdamW(model.parameters())
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()
        model(batch)["loss"].backward()
        opt.step()
        opt.zero_grad()
    return steps * 16 / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=30000, help="mixed rows to draw")
    args = p.parse_args()

    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        corpus = PreparedCorpus.open(
            write_synthetic_corpus(tmp, SIZES, frames=FRAMES, phonemes=PHONEMES, rows_per_shard=2000)
        )
        raw_rows, raw_frames = raw_read(corpus)
        planned = loader(corpus, args.rows, window_rows=2048)
        mixed = loader(corpus, args.rows, strategy="mix", block_rows=32)
        budget = loader(corpus, args.rows, max_tokens=MAX_TOKENS, window_rows=2048)
        step = train_rows_per_s(corpus)
    print(
        f"corpus {SIZES} train rows x {FRAMES[0]}-{FRAMES[1]} frames, {PHONEMES[0]}-{PHONEMES[1]} phonemes; "
        f"weights {WEIGHTS}; {args.rows} mixed rows, batches of 16 or max_tokens={MAX_TOKENS} "
        f"(<= {MAX_ROWS} rows, {BUCKET_ROWS}-row pools)"
    )
    print(f"raw pyarrow read        {raw_rows:9.0f} rows/s {raw_frames:11.0f} frames/s   1.00x")
    lines = (
        ("planned (default)", planned),
        ("Dataset.mix, 32-row", mixed),
        ("planned, token budget", budget),
    )
    for name, r in lines:
        print(
            f"{name:<23} {r['rows_per_s']:9.0f} rows/s {r['frames_per_s']:11.0f} frames/s   "
            f"{r['rows_per_s'] / raw_rows:.2f}x raw, {r['rows_per_s'] / step:.0f}x a training step | "
            f"max ratio error {r['max_err']:.4f}, {r['langs_per_batch']:.2f} languages/batch, "
            f"{r['rows_per_batch']:.1f} rows/batch, padding {r['padding']:.1%} "
            f"(frames only {r['frame_padding']:.1%})"
        )
    print(f"training step (small model, fp32, batch 16) consumes {step:.1f} rows/s")
    print("realized fractions (planned):", {k: round(v, 4) for k, v in planned["fractions"].items()})
    print(f"numpy {np.__version__}, torch threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
