"""How the data path's costs grow with languages and run length (issue 18).

    .venv/bin/python bench/scale.py                        # L = 4, 32, 128; 50k rows read; plans of 1e4..1e6 rows
    .venv/bin/python bench/scale.py --langs 4 128 --read-rows 50000 --plan-rows 10000 1000000

One command, one synthetic prepared corpus per language count (``vallex.data.synthetic``; no audio),
all with the same total rows and bytes: skewed sizes (language ``i`` of ``L`` gets a share ``1 / i``,
Zipf-like, at least 20 rows: a few large languages and a long tail of tiny ones), 2,000 rows per shard
(prepare's default), rows of 100-200 frames x 8 codebooks. Weights are temperature sampling
(``size ** 0.3``), so the tail is upsampled many times over.

Per language count it prints:

- **raw**: a plain ``pyarrow.parquet.read_table`` of every shard once (rows/s, the baseline; best of
  ``--repeat`` rounds, as is the mixer's figure);
- **mixer**: the planned mixed stream's read tasks (``vallex.data.mixing``'s datasource), run one
  after another in this process, exactly the functions Ray Data calls, without Ray (so that the bytes
  can be counted and the figure is the mixer's own cost, not the scheduler's): rows/s, ratio to raw,
  and **bytes read per row delivered** (``rchar`` of /proc/self/io, every byte the process read, over
  the rows delivered) as a multiple of a row's size on disk (corpus bytes / corpus rows);
- **ratio error**: the largest |realized - target| fraction over languages in those rows;
- **planning**: the driver's time and peak Python memory (``tracemalloc``) to plan the run and make
  its read tasks (``get_read_tasks``) for runs of ``--plan-rows`` rows, no row data read.

Then, for preparation, ``prepare_corpus`` up to the encode stage at 10^3..10^5 synthetic manifest
rows (8 languages, Zipf-like sizes), on a local Ray cluster of 2 CPUs started (and warmed) before the
clock: splits, phonemization with its cache, the skip filter, the symbol table, shard jobs and their
fingerprints. The phonemizer is stubbed (each text's characters as its symbols; the bench's own class,
pickled into the tasks) and the shard jobs are not encoded. Printed: wall time, the **driver process's
CPU time** (the work the driver itself does; Ray tasks run in other processes) and the driver's peak
Python memory (``tracemalloc``, in a second run). ``--langs`` with no value skips the mixer part:

    .venv/bin/python bench/scale.py --langs --prepare-rows 1000 10000 100000

To time older code with this file: ``git archive <commit> | tar -x -C /tmp/old``, then run this file
from /tmp/old with ``PYTHONPATH=/tmp/old`` (Ray's workers import ``vallex`` from the driver's working
directory, so the working directory must be the old tree too).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from vallex.data import mixing
from vallex.data.corpus import PreparedCorpus
from vallex.data.mixing import MixStats
from vallex.data.synthetic import write_synthetic_corpus

FRAMES, PHONEMES = (100, 200), (5, 20)
ROWS_PER_SHARD = 2000
WINDOW_ROWS = 2048


def skewed_sizes(num_langs: int, total: int, smallest: int = 20) -> dict[str, int]:
    share = 1.0 / np.arange(1, num_langs + 1)
    sizes = np.maximum(np.round(total * share / share.sum()).astype(int), smallest)
    return {f"l{i:03d}": int(n) for i, n in enumerate(sizes)}


def temperature_weights(sizes: dict[str, int], t: float = 0.3) -> dict[str, float]:
    raw = {lang: n**t for lang, n in sizes.items()}
    total = sum(raw.values())
    return {lang: w / total for lang, w in raw.items()}


def rchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def corpus_bytes(corpus: PreparedCorpus) -> tuple[int, int]:
    files = [p for lang in corpus.languages for p in corpus.shards(lang)]
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in files)
    return sum(os.path.getsize(p) for p in files), rows


def raw_read(corpus: PreparedCorpus) -> float:
    t0, rows = time.perf_counter(), 0
    for lang in corpus.languages:
        for shard in corpus.shards(lang):
            rows += pq.read_table(shard).num_rows
    return rows / (time.perf_counter() - t0)


def read_tasks(corpus, weights, num_rows: int):
    """The planned stream's Ray Data read tasks (what build_mixed_dataset hands to Ray Data)."""
    source = mixing.planned_datasource(corpus, weights, num_rows=num_rows, seed=0, window_rows=WINDOW_ROWS)
    return source.get_read_tasks(1)


def mixer(corpus, weights, num_rows: int) -> dict:
    stats = MixStats()
    before, t0 = rchar(), time.perf_counter()
    for task in read_tasks(corpus, weights, num_rows):
        for block in task():
            stats.update(block.column("language").to_numpy(zero_copy_only=False))
    dt = time.perf_counter() - t0
    return {"rows_per_s": stats.rows / dt, "bytes": rchar() - before, "rows": stats.rows, "stats": stats}


def planning(corpus, weights, num_rows: int) -> tuple[float, float, int]:
    gc.collect()
    t0 = time.perf_counter()
    tasks = read_tasks(corpus, weights, num_rows)
    dt = time.perf_counter() - t0
    n = len(tasks)
    del tasks
    gc.collect()
    tracemalloc.start()
    tasks = read_tasks(corpus, weights, num_rows)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del tasks
    return dt, peak / 2**20, n


class StubPhonemizer:
    """Bench only: each text's characters (spaces dropped) as its symbols, at no cost. Defined in the
    bench's ``__main__``, so Ray pickles it by value into the phonemize tasks (the real one is espeak)."""

    def __getstate__(self) -> dict:
        return {"stub": True}

    def __setstate__(self, state: dict) -> None:
        pass

    def __call__(self, texts: list[str], language: str) -> list[list[str]]:
        return [list(t.replace(" ", "")) for t in texts]


def prepare_driver(n_utts: int, tmp: str, trace: bool = False) -> dict:
    """prepare_corpus up to the encode stage on ``n_utts`` synthetic manifest rows (8 languages, skewed
    sizes), on the running Ray cluster, the phonemizer stubbed and the shard jobs not encoded: wall
    time, the driver process's CPU time (what the driver itself does; its tasks run in workers) and,
    with ``trace``, the driver's peak Python memory (tracemalloc; slower, so timed apart)."""
    import vallex.data.prepare as prep
    import vallex.text.phonemize as phonemize
    from vallex.config import PrepareSection
    from vallex.data.sources import Utterance

    sizes = skewed_sizes(8, n_utts, smallest=1)
    utts = []
    for lang, n in sizes.items():
        # Ids interleaved across languages, as a real manifest's rows come (not sorted by language).
        utts += [
            Utterance(
                f"u{i:07d}{lang}",
                f"/nonexistent/{lang}/{i}.wav",
                f"synthetic text {i} abc",
                lang,
                f"s{i % 50}",
            )
            for i in range(n)
        ]
    utts.sort(key=lambda u: u.id)
    saved = phonemize.Phonemizer, prep._run_jobs, prep._build_manifest
    jobs: list[int] = []
    phonemize.Phonemizer = StubPhonemizer
    prep._run_jobs = lambda j, *a, **k: jobs.append(len(j)) or {}  # no shard written
    prep._build_manifest = lambda *a, **k: {"languages": {}}
    out = Path(tmp, f"prep{n_utts}{'-traced' if trace else ''}")
    try:
        gc.collect()
        if trace:
            tracemalloc.start()
        t0, c0 = time.perf_counter(), time.process_time()
        prep.prepare_corpus(utts, out, PrepareSection(), progress=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        peak = tracemalloc.get_traced_memory()[1] / 2**20 if trace else None
    finally:
        if trace:
            tracemalloc.stop()
        phonemize.Phonemizer, prep._run_jobs, prep._build_manifest = saved
    shards = sum(-(-n // PrepareSection().rows_per_shard) for n in sizes.values())
    assert jobs == [shards], f"{jobs} shard jobs, expected {shards}"
    return {"wall": wall, "cpu": cpu, "peak": peak, "shards": shards, "largest": max(sizes.values())}


def prepare_bench(sizes: list[int], tmp: str) -> None:
    from vallex.runtime import init_ray

    init_ray(num_cpus=2)  # started before the clock: a cluster is up before a job
    prepare_driver(100, tmp)  # warm the workers (imports), as a long-lived cluster would be
    for n in sizes:
        r = prepare_driver(n, tmp)
        m = prepare_driver(n, tmp, trace=True)
        print(
            f"prepare to the encode stage, {n:>7} utterances ({r['shards']} shards, largest language "
            f"{r['largest']}): wall {r['wall']:6.2f} s = {n / r['wall']:7.0f} utt/s | driver CPU {r['cpu']:6.2f} s "
            f"= {n / max(r['cpu'], 1e-9):8.0f} utt/s | driver Python peak {m['peak']:7.1f} MiB | "
            f"load {os.getloadavg()[0]:.1f}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--langs", type=int, nargs="*", default=[4, 32, 128], help="language counts (none: skip)")
    p.add_argument("--corpus-rows", type=int, default=40000, help="train rows per corpus (all L)")
    p.add_argument("--read-rows", type=int, default=50000, help="mixed rows read per corpus")
    p.add_argument("--plan-rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument(
        "--prepare-rows",
        type=int,
        nargs="*",
        default=[1_000, 10_000, 100_000],
        help="manifest rows (none: skip)",
    )
    p.add_argument("--repeat", type=int, default=3, help="rounds of raw + mixer reads; the best is kept")
    p.add_argument("--row-group-rows", type=int, default=0, help="shard row group size (0: pyarrow's)")
    args = p.parse_args()
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
        f"corpus {args.corpus_rows} train rows x {FRAMES[0]}-{FRAMES[1]} frames, {ROWS_PER_SHARD} rows/shard, "
        f"row groups {args.row_group_rows or 'pyarrow default'}; window {WINDOW_ROWS} rows"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for L in args.langs:
            sizes = skewed_sizes(L, args.corpus_rows)
            kw = {"row_group_rows": args.row_group_rows} if args.row_group_rows else {}
            root = write_synthetic_corpus(
                Path(tmp, f"L{L}"),
                sizes,
                frames=FRAMES,
                phonemes=PHONEMES,
                rows_per_shard=ROWS_PER_SHARD,
                **kw,
            )
            corpus = PreparedCorpus.open(root)
            weights = temperature_weights(sizes)
            nbytes, nrows = corpus_bytes(corpus)
            row_size = nbytes / nrows
            # Best of --repeat, raw and mixer alternating: the machine is shared and its load drifts.
            raw, m = 0.0, None
            for _ in range(args.repeat):
                raw = max(raw, raw_read(corpus))
                r = mixer(corpus, weights, args.read_rows)
                m = r if m is None or r["rows_per_s"] > m["rows_per_s"] else m
            err = m["stats"].max_abs_error(weights)
            w = np.array(sorted(weights.values()))
            print(
                f"L={L:<4} sizes {max(sizes.values())}..{min(sizes.values())} rows, weights "
                f"{w[-1]:.3f}..{w[0]:.4f}; {nbytes / 2**20:.0f} MiB, {row_size / 1024:.1f} KiB/row on disk"
            )
            print(
                f"  raw pyarrow read {raw:9.0f} rows/s | mixer {m['rows_per_s']:8.0f} rows/s "
                f"({m['rows_per_s'] / raw:.2f}x raw) over {m['rows']} rows | bytes read per row "
                f"{m['bytes'] / m['rows'] / 1024:.1f} KiB = {m['bytes'] / m['rows'] / row_size:.1f}x a row | "
                f"max ratio error {err:.5f}"
            )
            for n in args.plan_rows:
                dt, peak, tasks = planning(corpus, weights, n)
                print(f"  plan {n:>9} rows: {dt * 1000:8.1f} ms, peak {peak:7.2f} MiB, {tasks} read tasks")
        if args.prepare_rows:
            prepare_bench(args.prepare_rows, tmp)


if __name__ == "__main__":
    main()
