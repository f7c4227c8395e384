"""Bytes each Train rank reads per row it trains on, with ``data.weights=online``, at 1 vs N ranks (issue 18).

    /work/main/.venv/bin/python bench/online_reads.py                     # L = 4, 32, 128; 1 and 4 ranks
    /work/main/.venv/bin/python bench/online_reads.py --langs 128 --ranks 1 8

With online weights every rank reads its own rows of each stretch in its training process
(``vallex.data.mixing.Stretches`` -> ``rank_rows`` -> ``numpy_batches``, what
``vallex.train.online_mix`` runs). Here the ranks are simulated one after another in this process, no
Ray: each rank starts with an empty footer cache (a worker process has its own) and its bytes are
``rchar`` of /proc/self/io (every byte the process read) over the rows it delivered, as a multiple of
a row's size on disk. The corpora are bench/scale.py's (skewed sizes, Zipf-like with a long tail,
2,000 rows a shard, 64-row row groups (``--row-group-rows``), rows of 100-200 frames x 8 codebooks); the weights are
temperature sampling (size ** 0.3) for the first stretch, then uniform, then proportional (online
weights move between stretches). A stretch is ``--stretch-rows`` rows for all ranks together.

Printed per language count and world size: bytes read per row delivered (mean over ranks, and the
worst rank), all ranks' bytes over all rows, and rows/s per rank. Each rank keeps its row-group reader
across stretches, as training does (``--fresh-reader``: a new one every stretch). If every rank read every group of
a stretch (and kept its own rows), a rank's bytes per row would grow about N-fold with N ranks.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from scale import FRAMES, PHONEMES, ROWS_PER_SHARD, corpus_bytes, rchar, skewed_sizes, temperature_weights

from vallex.data import mixing
from vallex.data.corpus import PreparedCorpus
from vallex.data.mixing import MixPlan, Stretches, numpy_batches, rank_rows

try:  # a reader kept across stretches, as training keeps it (absent before it existed)
    from vallex.data.mixing import group_reader
except ImportError:
    group_reader = None

BATCH = 8
WINDOW_ROWS = 2048


def read_ranks(corpus, schedule, world: int, keep_reader: bool = True) -> list[dict]:
    """Every rank's bytes, rows and seconds over the stretches of ``schedule`` (weights per stretch)."""
    langs = list(schedule[0][0])
    base = MixPlan.build(corpus, schedule[0][0], num_rows=0, seed=0, window_rows=WINDOW_ROWS)
    out = []
    for rank in range(world):
        stretches = Stretches(base)
        mixing._FOOTERS.clear()  # each rank is its own process: its own footer cache
        before, t0, rows = rchar(), time.perf_counter(), 0
        kw = {"reader": group_reader()} if group_reader is not None and keep_reader else {}
        for weights, num_rows in schedule:
            plan = stretches.plan({lang: weights[lang] for lang in langs}, num_rows)
            for batch in numpy_batches(rank_rows(plan, rank, world, BATCH, **kw), BATCH):
                rows += len(batch["language"])
            stretches.advance(plan)
        out.append({"bytes": rchar() - before, "rows": rows, "seconds": time.perf_counter() - t0})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--langs", type=int, nargs="+", default=[4, 32, 128])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 4])
    p.add_argument("--corpus-rows", type=int, default=40000, help="train rows per corpus (all L)")
    p.add_argument("--stretch-rows", type=int, default=8192, help="rows per stretch, all ranks together")
    p.add_argument("--stretches", type=int, default=3)
    p.add_argument("--row-group-rows", type=int, default=64, help="shard row group size")
    p.add_argument("--fresh-reader", action="store_true", help="a new row-group reader every stretch")
    args = p.parse_args()
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
        f"corpus {args.corpus_rows} train rows, {ROWS_PER_SHARD} rows/shard, {args.row_group_rows}-row groups; "
        f"{args.stretches} stretches of {args.stretch_rows} rows, batches of {BATCH}, window {WINDOW_ROWS}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for L in args.langs:
            sizes = skewed_sizes(L, args.corpus_rows)
            root = mixing_corpus(Path(tmp, f"L{L}"), sizes, args.row_group_rows)
            corpus = PreparedCorpus.open(root)
            nbytes, nrows = corpus_bytes(corpus)
            row_size = nbytes / nrows
            total = sum(sizes.values())
            policies = [
                temperature_weights(sizes),
                dict.fromkeys(sizes, 1 / L),
                {lang: n / total for lang, n in sizes.items()},
            ]
            schedule = [(policies[k % 3], args.stretch_rows) for k in range(args.stretches)]
            for world in args.ranks:
                ranks = read_ranks(corpus, schedule, world, not args.fresh_reader)
                per_row = [r["bytes"] / r["rows"] / row_size for r in ranks]
                all_ranks = sum(r["bytes"] for r in ranks) / sum(r["rows"] for r in ranks) / row_size
                rate = sum(r["rows"] for r in ranks) / sum(r["seconds"] for r in ranks)
                print(
                    f"L={L:<4} ranks={world:<2} bytes read per row delivered: mean {sum(per_row) / world:5.2f}x "
                    f"a row, worst rank {max(per_row):5.2f}x, all ranks {all_ranks:5.2f}x "
                    f"({row_size / 1024:.1f} KiB/row) | {rate:7.0f} rows/s per rank | "
                    f"load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )


def mixing_corpus(out: Path, sizes: dict[str, int], group_rows: int) -> Path:
    from vallex.data.synthetic import write_synthetic_corpus

    return write_synthetic_corpus(
        out, sizes, frames=FRAMES, phonemes=PHONEMES, rows_per_shard=ROWS_PER_SHARD, row_group_rows=group_rows
    )


if __name__ == "__main__":
    main()
