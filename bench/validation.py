"""What one Train worker reads and holds for validation, at many languages (issue 18 item 3).

    /work/main/.venv/bin/python bench/validation.py                      # L = 10, 100; cap 200 rows
    /work/main/.venv/bin/python bench/validation.py --langs 100 --valid-rows 1000 --cap 1000

Every worker calls ``vallex.data.corpus.read_split_rows`` on the run's validation source
(``split_source(corpus, languages, "valid", data.valid_max_rows)``), as ``WorkerRun._read_validation``
does, and keeps the tables for the losses, text gain and synthesis (``vallex.eval.intelligibility``).
Measured in this process, no Ray: the bytes read (``rchar`` of /proc/self/io), the seconds, and the
Arrow bytes held; then, for ``--ranks`` workers, what one rank evaluates: its rows (every world-th,
all columns) plus the light columns of every row that text gain and the synthesis plan use
(``phonemes``, ``speaker``, ``frames``), with the ``codes`` of the synthesized items left out (a few rows).

Corpora: bench/scale.py's synthetic rows (100-200 frames x 8 codebooks, ~1.5 KiB a row on disk; a
real 75 Hz, 5 s row is ~6 KiB), ``--valid-rows`` validation rows per language, 20 train rows each,
2,000 rows a shard, 64-row row groups.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from scale import FRAMES, PHONEMES, ROWS_PER_SHARD, rchar

from vallex.data.corpus import PreparedCorpus, read_split_rows, split_source
from vallex.data.synthetic import write_synthetic_corpus

LIGHT = ["phonemes", "speaker", "frames"]


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
            light = sum(t.select(LIGHT).nbytes for t in tables.values())
            print(
                f"L={L:<4} every worker: read {read / 2**20:7.1f} MiB in {seconds:5.1f} s, holds "
                f"{held / 2**20:7.1f} MiB ({rows} rows, {held / rows / 1024:.2f} KiB a row in memory) | "
                f"load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            for world in args.ranks:
                own = sum(t.take(np.arange(0, t.num_rows, world)).nbytes for t in tables.values())
                needed = own + light * (world - 1) / world
                print(
                    f"  {world:>3} workers: rank 0 evaluates {own / 2**20:7.1f} MiB of rows and needs "
                    f"{needed / 2**20:7.1f} MiB with every row's {'/'.join(LIGHT)} "
                    f"({held / needed:.1f}x less than it holds); all workers read "
                    f"{world * read / 2**20:8.1f} MiB for a {read / 2**20:.1f} MiB split",
                    flush=True,
                )


if __name__ == "__main__":
    main()
