"""What one Train worker reads and holds for validation, at many languages (issue 18 items 2-3).

    /work/main/.venv/bin/python bench/validation.py                      # L = 10, 100; cap 200 rows
    /work/main/.venv/bin/python bench/validation.py --langs 100 --valid-rows 1000 --cap 1000

Before: every worker called ``vallex.data.corpus.read_split_rows`` on the run's validation source
(``split_source(corpus, languages, "valid", data.valid_max_rows)``) and held the whole capped split.
Now ``WorkerRun._read_validation`` calls ``read_rank_rows(source, rank, world, extra)``: every column
of the rank's contiguous block of each language's rows, the light columns (``phonemes``, ``speaker``,
``frames``) of every row, and the few rows it synthesizes (``extra``; left out here: 2 rows and their
prompts per language by default, on rank k mod world). Both measured in this process, no Ray, one after
the other on the same files: bytes read (``rchar`` of /proc/self/io), seconds, Arrow bytes held; the
per-rank read for rank 0 and the last rank of each ``--ranks`` world.

Corpora: bench/scale.py's synthetic rows (100-200 frames x 8 codebooks, ~1.5 KiB a row on disk; a
real 75 Hz, 5 s row is ~6 KiB), ``--valid-rows`` validation rows per language, 20 train rows each,
2,000 rows a shard, 64-row row groups.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from scale import FRAMES, PHONEMES, ROWS_PER_SHARD, rchar

from vallex.data.corpus import PreparedCorpus, read_rank_rows, read_split_rows, split_source
from vallex.data.synthetic import write_synthetic_corpus


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--langs", type=int, nargs="+", default=[10, 100])
    p.add_argument("--valid-rows", type=int, default=200, help="validation rows per language")
    p.add_argument("--cap", type=int, default=200, help="data.valid_max_rows")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 4, 16])
    args = p.parse_args()
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
        f"{args.valid_rows} validation rows per language, cap {args.cap}, 64-row groups"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for L in args.langs:
            sizes = {f"l{i:03d}": 20 for i in range(L)}
            root = write_synthetic_corpus(
                Path(tmp, f"L{L}"),
                sizes,
                valid_per_language=args.valid_rows,
                frames=FRAMES,
                phonemes=PHONEMES,
                rows_per_shard=ROWS_PER_SHARD,
                row_group_rows=64,
            )
            corpus = PreparedCorpus.open(root)
            source = split_source(corpus, corpus.languages, "valid", args.cap)
            before, t0 = rchar(), time.perf_counter()
            tables = read_split_rows(source)
            seconds, read = time.perf_counter() - t0, rchar() - before
            rows = sum(t.num_rows for t in tables.values())
            held = sum(t.nbytes for t in tables.values())
            print(
                f"L={L:<4} before, every worker: read {read / 2**20:7.1f} MiB in {seconds:5.1f} s, holds "
                f"{held / 2**20:7.1f} MiB ({rows} rows) | load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            del tables
            for world in args.ranks:
                for rank in sorted({0, world - 1}):
                    before, t0 = rchar(), time.perf_counter()
                    mine = read_rank_rows(source, rank, world)
                    sec, got = time.perf_counter() - t0, rchar() - before
                    own = sum(t.nbytes for t in mine.values())
                    print(
                        f"  now, {world:>3} workers, rank {rank:>2}: read {got / 2**20:7.1f} MiB in {sec:5.1f} s "
                        f"({read / got:5.1f}x less), holds {own / 2**20:7.1f} MiB ({held / own:5.1f}x less) | "
                        f"load {os.getloadavg()[0]:.1f}",
                        flush=True,
                    )
                    del mine


if __name__ == "__main__":
    main()
