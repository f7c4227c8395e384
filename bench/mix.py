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
    collated batches (frames that are padding, the waste token-budget batching would cut).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from vallex.data.collate import collate
from vallex.data.corpus import PreparedCorpus
from vallex.data.mixing import MixStats, build_mixed_dataset
from vallex.data.synthetic import write_synthetic_corpus

WEIGHTS = {"en": 0.4, "zh": 0.35, "ar": 0.25}
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


def loader(corpus: PreparedCorpus, rows: int, **kw) -> dict:
    ids = {lang: i for i, lang in enumerate(corpus.languages)}
    ds = build_mixed_dataset(corpus, WEIGHTS, num_rows=rows, seed=0, **kw)
    stats, frames, padded = MixStats(), 0, 0
    t0 = time.perf_counter()
    for b in ds.iter_batches(
        batch_size=16, batch_format="numpy", local_shuffle_buffer_size=256, local_shuffle_seed=0
    ):
        stats.update(b)
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
        "padding": 1 - frames / padded,
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
            write_synthetic_corpus(tmp, SIZES, frames=(300, 500), rows_per_shard=2000)
        )
        raw_rows, raw_frames = raw_read(corpus)
        planned = loader(corpus, args.rows, window_rows=2048)
        mixed = loader(corpus, args.rows, strategy="mix", block_rows=32)
        step = train_rows_per_s(corpus)
    print(
        f"corpus {SIZES} train rows x 300-500 frames; weights {WEIGHTS}; {args.rows} mixed rows, batches of 16"
    )
    print(f"raw pyarrow read        {raw_rows:9.0f} rows/s {raw_frames:11.0f} frames/s   1.00x")
    for name, r in (("planned (default)", planned), ("Dataset.mix, 32-row", mixed)):
        print(
            f"{name:<23} {r['rows_per_s']:9.0f} rows/s {r['frames_per_s']:11.0f} frames/s   "
            f"{r['rows_per_s'] / raw_rows:.2f}x raw, {r['rows_per_s'] / step:.0f}x a training step | "
            f"max ratio error {r['max_err']:.4f}, {r['langs_per_batch']:.2f} languages/batch, "
            f"padding {r['padding']:.1%}"
        )
    print(f"training step (small model, fp32, batch 16) consumes {step:.1f} rows/s")
    print("realized fractions (planned):", {k: round(v, 4) for k, v in planned["fractions"].items()})
    print(f"numpy {np.__version__}, torch threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
