"""One streaming Ray dataset that mixes every training language by weight.

Training all languages together is how vallex avoids forgetting old languages when a new one is
added, so the mix must hold its ratios over the whole run, including for a language far smaller than
its share (an upsampled low-resource language), and every batch should hold several languages.

Two strategies, both streaming (a few shards in memory per read task, never the corpus):

``planned`` (default)
    The output is cut into windows of ``window_rows`` rows, each window gets an exact per-language
    row count (cumulative largest remainder, so every prefix of windows is within one row per
    language of its target), and each language's rows come from consecutive *passes* over its
    shards, every pass with a fresh shard order, a fresh Parquet row-group order inside each shard
    and a fresh row order inside each group, all drawn from ``seed``. A read task builds
    ``TASK_WINDOWS`` consecutive windows, one block each: it reads the row groups the windows' slices
    touch, keeping each language's current groups between windows (a reader that keeps its position),
    and interleaves the languages row by row. Ratios are exact by construction, per window, and so
    per Ray Train worker too (``streaming_split`` hands out whole blocks); batches mix languages
    without relying on a shuffle buffer; and there is a single Ray Data operator, so nothing can starve.

    Costs grow with the rows, not with languages x windows (measured in bench/scale.py): the plan
    (:class:`MixPlan`) is O(languages + row groups) to describe and computes window ``k`` on demand;
    the driver walks the counts once to hand each read task its starting positions (O(languages)
    per task); a row group is read about once per visit of its pass, plus one per language at each
    read task's edges, and each shard's footer once per worker process.

``mix``
    Ray's ``Dataset.mix`` over one source per language (repeated enough passes to supply its share,
    cut into ``block_rows``-row blocks, ``STOP_ON_SHORTEST`` then ``limit``), as shared STACK.md
    describes. Kept as the measured baseline. Its ratios are also accurate (about one block per
    language), but one block is one language, so batches mix only through the consumer's shuffle
    buffer; and on Ray 2.58 it stalls when the cluster is short of CPUs or object store for its
    2 operators per language: ``Mix`` waits for the source furthest behind while the others' queued
    blocks hold the budget that source needs (seen with 4 CPUs and a 100 MiB object store; with
    16 CPUs it crawled). See tests/data/test_mixing.py for the figures.

:class:`MixStats` counts what was actually drawn, for the training loop to report.
"""

from __future__ import annotations

import dataclasses
import math
import os
import zlib
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data
from ray.data import Datasource, MixStoppingCondition, ReadTask
from ray.data.block import BlockMetadata

from vallex.data.corpus import PreparedCorpus
from vallex.data.weights import normalize
from vallex.files import is_uri

TRAIN_SPLIT = "train"
STRATEGIES = ("planned", "mix")


def normalize_weights(corpus: PreparedCorpus, weights: Mapping[str, float]) -> dict[str, float]:
    """The languages to draw from (weight > 0, sorted) with weights summing to 1; checks them against
    the corpus so that a bad mapping fails here, not inside a Ray task. Weights from
    :func:`vallex.data.weights.resolve_weights` (a run's plan) already sum to 1 and are kept as they are."""
    active = {lang: float(w) for lang, w in weights.items() if w > 0}
    if not active:
        raise ValueError(f"weights {dict(weights)} select no language; at least one weight must be > 0")
    unknown = sorted(set(active) - set(corpus.languages))
    if unknown:
        raise ValueError(
            f"weights name {unknown}, which {corpus.root} does not hold; it has {corpus.languages}"
        )
    counts = corpus.counts(TRAIN_SPLIT)
    empty = sorted(lang for lang in active if counts[lang] == 0)
    if empty:
        raise ValueError(f"languages {empty} have weight > 0 but no train rows in {corpus.root}")
    return normalize({lang: active[lang] for lang in sorted(active)}, f"weights {dict(weights)}")


def _language_seed(seed: int, lang: str) -> tuple[int, int]:
    # Keyed by the language's code, not its position, so adding a language leaves the others' order alone.
    return (seed, zlib.crc32(lang.encode()))


def _read_shard(path: str, columns: list[str] | None) -> pa.Table:
    read_columns = None if columns is None else sorted(set(columns) | {"split"})
    return pq.read_table(path, columns=read_columns)


def _train_order(table: pa.Table, path: str, seed: Iterable[int], expected: int) -> np.ndarray:
    """Indices of ``table``'s train rows in an order fixed by ``seed`` (a pass's order of one shard).

    Indices rather than a filtered table: a filter copies every list column, and the caller usually
    takes only a slice of the order, so one ``take`` of the rows it needs is the only copy.
    """
    train = np.flatnonzero(pc.equal(table["split"], TRAIN_SPLIT).to_numpy(zero_copy_only=False))
    if len(train) != expected:
        raise RuntimeError(
            f"{path}: holds {len(train)} train rows but {expected} were planned; "
            "the corpus changed after the dataset was built: rebuild it"
        )
    return train[np.random.default_rng(list(seed)).permutation(len(train))]


def _project(table: pa.Table, columns: list[str] | None) -> pa.Table:
    return table if columns is None else table.select(columns)


# ---------------------------------------------------------------------------------------------------
# planned
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of one pass's shuffled order of one shard's train rows."""

    lang: str
    path: str
    seed: tuple[int, ...]  # (seed, language key, pass, shard index): fixes the row order of this pass
    shard_rows: int  # train rows in the shard, re-checked when read
    start: int
    stop: int
    group_rows: tuple[int, ...] = ()  # train rows per Parquet row group (one group if empty)


@dataclass(frozen=True)
class Window:
    """One output block: its pieces, interleaved row by row in an order fixed by ``seed``."""

    index: int
    pieces: tuple[Piece, ...]
    seed: tuple[int, ...]
    skip: int = 0  # leading rows (after interleaving) already consumed before a resume

    @property
    def num_rows(self) -> int:
        return sum(p.stop - p.start for p in self.pieces) - self.skip

    def counts(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for p in self.pieces:
            out[p.lang] += p.stop - p.start
        return dict(out)


def _next_counts(w: np.ndarray, taken: np.ndarray, start: int, end: int) -> np.ndarray:
    """Rows per language of the window ``[start, end)`` after ``taken`` rows (see :func:`window_counts`)."""
    deficit = w * end - taken  # sums to end - start exactly (up to float error)
    n = np.maximum(np.floor(deficit), 0).astype(np.int64)
    short = (end - start) - int(n.sum())
    # Hand out (or take back) single rows by fractional part: at most one per language per window.
    order = np.argsort(-(deficit - n), kind="stable")
    if short > 0:
        n[order[:short]] += 1
    elif short < 0:
        donors = [i for i in order[::-1] if n[i] > 0][:-short]
        n[donors] -= 1
    return n


def window_counts(weights: Mapping[str, float], num_rows: int, window_rows: int) -> np.ndarray:
    """``[windows, languages]`` rows per window and language (languages in ``weights`` order).

    Each window's counts are the cumulative target ``w * rows_so_far`` minus what earlier windows
    took, rounded by largest remainder: every window boundary is within about one row per language of
    the exact ratio, whatever the weights, and the run's total is exact. The planner computes the same
    counts one window at a time (:meth:`MixPlan.counts`), never this whole array.
    """
    w = np.asarray(list(weights.values()), dtype=np.float64)
    plan_rows = [
        _next_counts(w, taken, start, end)
        for start, end, taken in _count_walk(w, num_rows, window_rows, 0, math.ceil(num_rows / window_rows))
    ]
    return np.asarray(plan_rows, dtype=np.int64).reshape(-1, len(w))


def _count_walk(w: np.ndarray, num_rows: int, window_rows: int, first: int, last: int, carry=0.0):
    """``(start, end, taken before)`` of windows ``first..last-1``, walking the counts from window 0
    (O(languages) memory; the caller computes the window's counts from ``taken``). ``carry``: rows
    per language owed from earlier stretches (see :attr:`MixPlan.carry`)."""
    taken = np.zeros(len(w), dtype=np.int64)
    for k in range(last):
        start, end = k * window_rows, min((k + 1) * window_rows, num_rows)
        if k >= first:
            yield start, end, taken.copy()
        taken += _next_counts(w, taken - carry, start, end)


class _LanguageStream:
    """A language's train rows as an endless sequence of reshuffled passes over its shards.

    A pass visits the shards in a shuffled order, each shard's Parquet row groups in a shuffled
    order, and each group's train rows in a shuffled order (all drawn from ``seed`` and the pass), so
    consecutive stream positions lie in one row group: a reader needs only the groups a window's
    slice touches, not whole shards. A shard written as one row group is shuffled row by row, as
    before row groups were used.
    """

    def __init__(self, lang: str, paths: list[str], group_rows: list[list[int]], seed: tuple[int, ...]):
        self.lang, self.paths, self.seed = lang, paths, seed
        self.group_rows = [tuple(int(n) for n in g) for g in group_rows]
        self.shard_rows = np.asarray([sum(g) for g in self.group_rows], dtype=np.int64)
        self.rows_per_pass = int(self.shard_rows.sum())
        self._orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _pass_order(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard visiting order of pass ``p`` and the cumulative rows at the end of each visit."""
        if p not in self._orders:
            if len(self._orders) > 4:  # a reader moves forward: old passes are not asked again
                self._orders.pop(min(self._orders))
            order = np.random.default_rng([*self.seed, p]).permutation(len(self.paths))
            self._orders[p] = (order, np.cumsum(self.shard_rows[order]))
        return self._orders[p]

    def pieces(self, begin: int, end: int) -> list[Piece]:
        """The pieces covering stream positions ``[begin, end)``."""
        out = []
        pos = begin
        while pos < end:
            p, offset = divmod(pos, self.rows_per_pass)
            order, cum = self._pass_order(p)
            j = int(np.searchsorted(cum, offset, side="right"))  # skips shards with no train rows
            shard = int(order[j])
            start = offset - int(cum[j] - self.shard_rows[shard])
            stop = min(int(self.shard_rows[shard]), start + (end - pos))
            out.append(
                Piece(
                    self.lang,
                    self.paths[shard],
                    (*self.seed, p, shard),
                    int(self.shard_rows[shard]),
                    start,
                    stop,
                    self.group_rows[shard],
                )
            )
            pos += stop - start
        return out


@dataclass(frozen=True)
class MixPlan:
    """The planned run, O(languages + row groups) to describe: window ``k``'s counts and pieces are
    computed on demand (:meth:`windows`), never stored for the whole run."""

    weights: tuple[float, ...]
    streams: tuple[_LanguageStream, ...]
    num_rows: int
    window_rows: int
    seed: int
    # A later stretch of an online run (see Stretches): each stream's position at the plan's row 0,
    # a salt for the window seeds (stretches do not repeat interleave orders), and the rows each
    # language is owed by earlier stretches' rounding (target - drawn, summing to 0), added to the
    # cumulative target so that rounding never drifts the same way stretch after stretch.
    offsets: tuple[int, ...] = ()
    salt: tuple[int, ...] = ()
    carry: tuple[float, ...] = ()

    def _carry(self):
        return np.asarray(self.carry, dtype=np.float64) if self.carry else 0.0

    @classmethod
    def build(cls, corpus: PreparedCorpus, weights: Mapping[str, float], *, num_rows, seed, window_rows):
        """``weights``: languages to draw from, each > 0, summing to 1 (see :func:`normalize_weights`)."""
        streams = tuple(
            _LanguageStream(
                lang, corpus.shards(lang), corpus.group_rows(lang, TRAIN_SPLIT), _language_seed(seed, lang)
            )
            for lang in weights
        )
        return cls(tuple(weights.values()), streams, num_rows, window_rows, seed)

    @property
    def num_windows(self) -> int:
        return math.ceil(self.num_rows / self.window_rows)

    def walk(self, first: int = 0, last: int | None = None):
        """``(window index, start, end, rows taken per language before it)`` for windows
        ``first..last-1`` (O(languages) memory; time O(last x languages))."""
        last = self.num_windows if last is None else last
        w = np.asarray(self.weights, dtype=np.float64)
        for k, (start, end, taken) in enumerate(
            _count_walk(w, self.num_rows, self.window_rows, first, last, self._carry()), start=first
        ):
            yield k, start, end, taken

    def windows(self, first: int, last: int, taken: np.ndarray, skip: int = 0) -> Iterator[Window]:
        """Windows ``first..last-1`` given the rows ``taken`` per language before ``first`` (from
        :meth:`walk`); ``skip`` leading rows of the first one are left out (resume)."""
        w = np.asarray(self.weights, dtype=np.float64)
        taken = np.array(taken, dtype=np.int64)
        offsets = np.asarray(self.offsets or [0] * len(self.streams), dtype=np.int64)
        for k in range(first, last):
            start, end = k * self.window_rows, min((k + 1) * self.window_rows, self.num_rows)
            n = _next_counts(w, taken - self._carry(), start, end)
            pieces = []
            for i, s in enumerate(self.streams):
                begin = int(offsets[i] + taken[i])
                pieces += s.pieces(begin, begin + int(n[i]))
            taken += n
            yield Window(k, tuple(pieces), (self.seed, *self.salt, k), skip if k == first else 0)

    def totals(self) -> dict[str, int]:
        """Rows per language in the whole plan (walks the counts: O(windows x languages))."""
        if self.num_rows <= 0:
            return {s.lang: 0 for s in self.streams}
        k, start, end, taken = next(self.walk(self.num_windows - 1))
        n = taken + _next_counts(
            np.asarray(self.weights, dtype=np.float64), taken - self._carry(), start, end
        )
        return {s.lang: int(c) for s, c in zip(self.streams, n, strict=True)}

    def stretch(
        self,
        weights: Mapping[str, float],
        num_rows: int,
        offsets: Mapping[str, int],
        index: int,
        carry: Mapping[str, float] | None = None,
    ):
        """The plan of one stretch of an online run: the same language streams, ``num_rows`` rows at
        ``weights`` (a language of this plan missing from them gets none), each stream continuing at
        ``offsets``, window seeds salted with ``index``, earlier stretches' rounding owed (``carry``)."""
        langs = [s.lang for s in self.streams]
        raw = [max(float(weights.get(lang, 0.0)), 0.0) for lang in langs]
        total = math.fsum(raw)
        if total <= 0:
            raise ValueError(f"stretch {index}: weights {dict(weights)} give none of {langs} a row")
        return dataclasses.replace(
            self,
            weights=tuple(w / total for w in raw),
            num_rows=int(num_rows),
            offsets=tuple(int(offsets.get(lang, 0)) for lang in langs),
            salt=(int(index),),
            carry=tuple(float((carry or {}).get(lang, 0.0)) for lang in langs),
        )


def plan_mix(
    corpus: PreparedCorpus,
    weights: Mapping[str, float],
    *,
    num_rows: int,
    seed: int,
    window_rows: int,
    start_row: int = 0,
) -> list[Window]:
    """The run's windows from row ``start_row`` on, as a list (for inspection and tests; the dataset
    computes them one read task at a time). The windows before ``start_row`` are walked too, so the
    rest is unchanged."""
    weights = normalize_weights(corpus, weights)
    plan = MixPlan.build(corpus, weights, num_rows=num_rows, seed=seed, window_rows=window_rows)
    first, skip = divmod(start_row, window_rows)
    if first >= plan.num_windows:
        return []
    _, _, _, taken = next(plan.walk(first, first + 1))
    return list(plan.windows(first, plan.num_windows, taken, skip))


_FOOTERS: OrderedDict[tuple, pq.FileMetaData] = OrderedDict()
FOOTERS_KEPT = 1024  # per worker process: ~30 KiB each for a 2,000-row shard of 64-row groups


def _open_shard(path: str, opened: dict[str, pq.ParquetFile]) -> pq.ParquetFile:
    """``path`` opened with its footer read once per worker process (local files, keyed by size and
    mtime, so a rewritten shard is read afresh) or once per read task (``opened``; URIs): a read task
    reads a few row groups of each shard, and re-reading the footer each time costs as much as them."""
    if path in opened:
        return opened[path]
    if is_uri(path):
        file = pq.ParquetFile(path)
    else:
        st = os.stat(path)
        key = (path, st.st_size, st.st_mtime_ns)
        meta = _FOOTERS.get(key)
        file = pq.ParquetFile(path, metadata=meta)
        _FOOTERS[key] = file.metadata
        _FOOTERS.move_to_end(key)
        if len(_FOOTERS) > FOOTERS_KEPT:
            _FOOTERS.popitem(last=False)
    if len(opened) >= 256:  # file handles: keep well under the process's limit
        opened.clear()
    opened[path] = file
    return file


class _GroupReader:
    """Reads the Parquet row groups a read task's pieces need, keeping the last few of each language
    (a window takes a few consecutive rows of a group; the next window of the task continues there),
    so a group is read about once per visit of its pass rather than once per window."""

    def __init__(self, columns: list[str] | None, keep: int = 4):
        self.read_columns = None if columns is None else sorted(set(columns) | {"split"})
        self.keep = keep
        self._groups: dict[str, dict[tuple[str, int], tuple[pa.Table, np.ndarray]]] = {}
        self._layouts: dict[tuple, list[tuple[int, np.ndarray]]] = {}
        self._files: dict[str, pq.ParquetFile] = {}

    def _group(self, lang: str, path: str, g: int, expected: int) -> tuple[pa.Table, np.ndarray]:
        cache = self._groups.setdefault(lang, {})
        key = (path, g)
        if key in cache:
            cache[key] = cache.pop(key)  # most recently used last
            return cache[key]
        table = _open_shard(path, self._files).read_row_group(g, columns=self.read_columns)
        train = np.flatnonzero(pc.equal(table["split"], TRAIN_SPLIT).to_numpy(zero_copy_only=False))
        if len(train) != expected:
            raise RuntimeError(
                f"{path}: row group {g} holds {len(train)} train rows but {expected} were planned; "
                "the corpus changed after the dataset was built: rebuild it"
            )
        if len(cache) >= self.keep:
            cache.pop(next(iter(cache)))
        cache[key] = (table, train)
        return cache[key]

    def _layout(self, piece: Piece) -> list[tuple[int, np.ndarray]]:
        """The pass's order of the shard's train rows: ``(group, order of its train rows)`` per group."""
        key = (piece.path, piece.seed)
        if key not in self._layouts:
            if len(self._layouts) > 256:
                self._layouts.clear()
            groups = piece.group_rows or (piece.shard_rows,)
            rng = np.random.default_rng(list(piece.seed))
            if len(groups) == 1:  # the same draw as a whole-shard shuffle
                self._layouts[key] = [(0, rng.permutation(groups[0]))]
            else:
                self._layouts[key] = [
                    (int(g), rng.permutation(groups[g])) for g in rng.permutation(len(groups))
                ]
        return self._layouts[key]

    def read(self, piece: Piece) -> Iterator[tuple[tuple[str, int], pa.Table, np.ndarray]]:
        """``(group key, group table, rows of it)`` covering ``piece``, in the piece's order."""
        pos = 0
        for g, order in self._layout(piece):
            lo, hi = max(piece.start - pos, 0), min(piece.stop - pos, len(order))
            if lo < hi:
                table, train = self._group(piece.lang, piece.path, g, len(order))
                yield (piece.path, g), table, train[order[lo:hi]]
            pos += len(order)
            if pos >= piece.stop:
                break


def _window_table(window: Window, reader: _GroupReader, columns: list[str] | None) -> pa.Table:
    # One take over the groups the window touches (a take per piece costs more than the reads at
    # 100+ languages): each group once, the rows as indices into their concatenation.
    first_row: dict[tuple[str, int], int] = {}  # group -> its first row in the concatenation
    tables, rows, total = [], [], 0
    for piece in window.pieces:
        for key, table, idx in reader.read(piece):
            if key not in first_row:
                first_row[key] = total
                tables.append(table)
                total += table.num_rows
            rows.append(first_row[key] + idx)
    # Row-level interleave: any run of consecutive rows holds the languages about in ratio.
    rows = np.concatenate(rows)
    order = np.random.default_rng(list(window.seed)).permutation(len(rows))
    table = pa.concat_tables(
        [_project(t, columns) for t in tables]
    ).combine_chunks()  # take is slow on many chunks
    return table.take(rows[order[window.skip :]])


def _read_windows(plan, first: int, last: int, taken: np.ndarray, skip: int, columns) -> Iterable[pa.Table]:
    """One read task: windows ``first..last-1``, one block each, through one reader."""
    if isinstance(plan, ray.ObjectRef):
        plan = ray.get(plan)
    reader = _GroupReader(columns)
    for window in plan.windows(first, last, taken, skip):
        yield _window_table(window, reader, columns)


# ---------------------------------------------------------------------------------------------------
# stretches (data.weights=online): weights that change between evaluations
# ---------------------------------------------------------------------------------------------------


def rank_rows(
    plan: MixPlan, rank: int, world: int, unit: int, columns=None, reader: _GroupReader | None = None
) -> Iterator[pa.Table]:
    """Rank ``rank``'s rows of ``plan``, read in this process, window by window (:func:`rank_share`).

    Each rank reads only its own share: its rows lie in the row groups of its own stretch of each
    language's stream, so a rank reads about ``1 / world`` of the plan's groups (plus at most one
    group per language at each edge of its share, which the neighbouring rank reads too), not all of
    them. ``reader`` (:func:`group_reader`, with the same ``columns``) keeps each language's last row
    groups from one plan to the next: a tiny language held in one group is read once per run, not once
    per stretch.
    """
    columns = _with_language(columns)
    share = rank_share(plan, rank, world, unit)
    reader = reader if reader is not None else _GroupReader(columns)
    for window in share.windows(0, share.num_windows, np.zeros(len(share.streams), dtype=np.int64)):
        yield _window_table(window, reader, columns)


def _with_language(columns):
    return columns if columns is None or "language" in columns else [*columns, "language"]


def group_reader(columns=None) -> _GroupReader:
    """A row-group reader for :func:`rank_rows` that lives across stretches (one per rank)."""
    return _GroupReader(_with_language(columns))


def rank_rows_count(num_rows: int, rank: int, world: int, unit: int) -> int:
    """Rows of a ``num_rows``-row plan that rank ``rank`` of ``world`` gets: ``unit``-row units
    (batches) dealt round robin, so every rank gets whole batches and the counts differ by at most a unit."""
    full, rest = divmod(num_rows, unit * world)
    return full * unit + min(max(rest - rank * unit, 0), unit)


def rank_share(plan: MixPlan, rank: int, world: int, unit: int) -> MixPlan:
    """Rank ``rank``'s part of ``plan`` as its own plan: its rows (:func:`rank_rows_count`) at the plan's
    ratios, from a contiguous stretch of each language's stream.

    The plan's rows per language (:meth:`MixPlan.totals`) are split between the ranks in rank order
    by cumulative largest remainder (the windows' rule, with ranks as windows): the shares add up to
    the plan's totals exactly, the first ``r`` ranks' counts together are within one row per language
    of their rows x the plan's ratios (one rank's, within two), and rank ``r`` continues each stream
    where rank ``r - 1``'s share ends, so no two ranks share a row and a rank's rows lie in few row
    groups. Inside its share a rank's windows
    interleave the languages row by row (several languages per batch), with window seeds salted by
    the rank. ``world == 1``: the plan itself.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world={world}), got {rank}")
    if world == 1:
        return plan
    totals = np.asarray(list(plan.totals().values()), dtype=np.int64)
    w = totals / max(int(totals.sum()), 1)
    taken, start = np.zeros(len(totals), dtype=np.int64), 0
    for r in range(rank + 1):
        rows = rank_rows_count(plan.num_rows, r, world, unit)
        n = totals - taken if r == world - 1 else _next_counts(w, taken, start, start + rows)
        if r < rank:
            taken, start = taken + n, start + rows
    offsets = np.asarray(plan.offsets or [0] * len(plan.streams), dtype=np.int64) + taken
    return dataclasses.replace(
        plan,
        weights=tuple((n / max(rows, 1)).tolist()),
        num_rows=int(rows),
        offsets=tuple(int(o) for o in offsets),
        salt=(*plan.salt, world, rank),  # one element longer than any stretch's salt
        carry=(),
    )


def numpy_batches(tables: Iterable[pa.Table], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Consecutive ``batch_size``-row batches of the tables' rows, as Ray's ``iter_batches(
    batch_format="numpy")`` gives them (list columns as object arrays of numpy arrays); a short last
    batch is dropped (the stretches are sized in whole batches, so there is none)."""
    pending: list[pa.Table] = []
    held = 0
    for table in tables:
        pending.append(table)
        held += table.num_rows
        while held >= batch_size:
            joined = pa.concat_tables(pending).combine_chunks()
            batch, rest = joined.slice(0, batch_size), joined.slice(batch_size)
            yield {c: batch.column(c).to_numpy(zero_copy_only=False) for c in batch.column_names}
            pending, held = [rest], rest.num_rows


@dataclass
class Stretches:
    """A run's training rows as consecutive stretches, each its own :class:`MixPlan` with the weights
    of that stretch (``data.weights=online``: the weights change at every evaluation).

    Every language's stream position is carried from one stretch to the next (``offsets``), so the
    run walks each language's reshuffled passes exactly as a static run does: no row is repeated
    before its pass ends and none is skipped, whatever the weights; only how many rows each language
    gives per stretch changes. A stretch's per-language counts are exact (cumulative largest
    remainder, as in a static plan), and the rounding is carried too (``carry``): over any number of
    stretches each language's rows stay within one of the sum of its weight x rows. The state
    (``offsets``, ``index``, ``carry``) is plain data for a checkpoint: a resumed run plans the next
    stretch exactly as the uninterrupted run did.
    """

    base: MixPlan  # the language streams (every language that may get rows), seed and window size
    offsets: dict[str, int] = dataclasses.field(default_factory=dict)
    index: int = 0  # stretches finished
    carry: dict[str, float] = dataclasses.field(default_factory=dict)  # rows owed: targets - drawn

    def plan(self, weights: Mapping[str, float], num_rows: int) -> MixPlan:
        """The next stretch: ``num_rows`` rows at ``weights``, continuing every stream."""
        return self.base.stretch(weights, num_rows, self.offsets, self.index, self.carry)

    def advance(self, stretch: MixPlan) -> dict[str, int]:
        """Mark ``stretch`` (from :meth:`plan`) as drawn; the rows it gave per language."""
        rows = stretch.totals()
        for (lang, n), w, owed in zip(
            rows.items(), stretch.weights, stretch.carry or [0.0] * len(rows), strict=True
        ):
            self.offsets[lang] = self.offsets.get(lang, 0) + n
            self.carry[lang] = owed + w * stretch.num_rows - n  # within one row: rounding only
        self.index += 1
        return rows

    def state(self) -> dict:
        return {"offsets": dict(self.offsets), "index": self.index, "carry": dict(self.carry)}

    @classmethod
    def restore(cls, base: MixPlan, state: Mapping | None) -> Stretches:
        if not state:
            return cls(base)
        offsets = {k: int(v) for k, v in state["offsets"].items()}
        return cls(base, offsets, int(state["index"]), {k: float(v) for k, v in state["carry"].items()})


TASK_WINDOWS = 16  # windows per read task: a language's row group is read once per task, not per window


class _PlannedMix(Datasource):
    """Read tasks of ``TASK_WINDOWS`` consecutive windows each, in window order; the plan is walked
    once to make them (O(languages) per task), and each task computes its own windows."""

    def __init__(self, plan: MixPlan, start_row: int, columns: list[str] | None):
        self._plan = plan
        self._start_row = start_row
        self._columns = columns

    def get_name(self) -> str:
        return "PlannedMix"

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def num_tasks(self) -> int:
        first = self._start_row // self._plan.window_rows
        return math.ceil((self._plan.num_windows - first) / TASK_WINDOWS)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
        plan = self._plan
        first, skip = divmod(self._start_row, plan.window_rows)
        # A large corpus's plan (shard paths, row group sizes) is shipped once, not inside every task.
        shipped = ray.put(plan) if ray.is_initialized() else plan
        tasks = []
        for k, start, _, taken in plan.walk(first):
            if (k - first) % TASK_WINDOWS:
                continue
            last = min(k + TASK_WINDOWS, plan.num_windows)
            lead = skip if k == first else 0
            rows = min(last * plan.window_rows, plan.num_rows) - start - lead
            tasks.append(
                ReadTask(
                    partial(_read_windows, shipped, k, last, taken, lead, self._columns),
                    BlockMetadata(num_rows=rows, size_bytes=None, exec_stats=None),
                    per_task_row_limit=per_task_row_limit,
                )
            )
        return tasks


def planned_datasource(
    corpus: PreparedCorpus,
    weights: Mapping[str, float],
    *,
    num_rows: int,
    seed: int,
    window_rows: int,
    start_row: int = 0,
    columns: list[str] | None = None,
) -> _PlannedMix:
    """The ``planned`` strategy's Ray Data datasource (what :func:`build_mixed_dataset` reads)."""
    weights = normalize_weights(corpus, weights)
    plan = MixPlan.build(corpus, weights, num_rows=num_rows, seed=seed, window_rows=window_rows)
    return _PlannedMix(plan, start_row, columns)


# ---------------------------------------------------------------------------------------------------
# mix (Ray Dataset.mix baseline)
# ---------------------------------------------------------------------------------------------------


def _read_shard_pass(path: str, columns, seed: tuple[int, ...], expected: int) -> Iterable[pa.Table]:
    table = _read_shard(path, columns)
    yield _project(table.take(_train_order(table, path, seed, expected)), columns)


class _LanguagePasses(Datasource):
    """``passes`` reshuffled passes over one language's shards; one read task per (pass, shard)."""

    def __init__(self, stream: _LanguageStream, passes: int, columns):
        self._stream = stream
        self._passes = passes
        self._columns = columns

    def get_name(self) -> str:
        return f"Passes[{self._stream.lang} x{self._passes}]"

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
        s = self._stream
        tasks = []
        for p in range(self._passes):
            order, _ = s._pass_order(p)
            for shard in order.tolist():
                rows = int(s.shard_rows[shard])
                if rows == 0:
                    continue
                read = partial(_read_shard_pass, s.paths[shard], self._columns, (*s.seed, p, shard), rows)
                meta = BlockMetadata(
                    num_rows=rows, size_bytes=None, exec_stats=None, input_files=(s.paths[shard],)
                )
                tasks.append(ReadTask(read, meta, per_task_row_limit=per_task_row_limit))
        return tasks


def _build_block_mix(corpus, weights, *, num_rows, seed, block_rows, columns) -> ray.data.Dataset:
    sources = []
    for lang, w in weights.items():
        stream = _LanguageStream(
            lang, corpus.shards(lang), corpus.group_rows(lang, TRAIN_SPLIT), _language_seed(seed, lang)
        )
        # One block of slack: Mix decides block by block, so a source may be asked for up to one
        # block beyond its exact share before the run's last row; running dry earlier would stop the run.
        passes = max(1, math.ceil((num_rows * w + block_rows) / stream.rows_per_pass))
        datasource = _LanguagePasses(stream, passes, columns)
        # One block per read task: without the override Ray first splits each read into arbitrary pieces.
        ds = ray.data.read_datasource(datasource, override_num_blocks=passes * len(stream.paths))
        sources.append(ds.repartition(target_num_rows_per_block=block_rows, strict=True))
    mixed = sources[0].mix(
        *sources[1:], weights=list(weights.values()), stopping_condition=MixStoppingCondition.STOP_ON_SHORTEST
    )
    return mixed.limit(num_rows)


# ---------------------------------------------------------------------------------------------------


def build_mixed_dataset(
    corpus: PreparedCorpus,
    weights: Mapping[str, float],
    *,
    num_rows: int,
    seed: int,
    block_rows: int = 32,
    window_rows: int = 2048,
    columns: list[str] | None = None,
    strategy: str = "planned",
    preserve_order: bool = True,
    start_row: int = 0,
) -> ray.data.Dataset:
    """A streaming dataset of exactly ``num_rows`` train rows, each language's share close to its weight.

    ``weights`` usually come from :func:`vallex.data.weights.resolve_weights`; languages with weight 0
    are left out. ``columns`` projects the shards (``language`` is always kept: mixing statistics and
    collate need it). ``window_rows`` is the block size of the ``planned`` strategy (larger: fewer
    re-reads of each shard, more memory per block); ``block_rows`` that of ``mix``.

    ``start_row`` resumes a run (``planned`` only; Ray Data iterators keep no position): the dataset
    yields rows ``start_row..num_rows-1`` of the same run, e.g. after a checkpoint at
    ``start_row = steps_done * global_batch_size``.

    Determinism (checked in tests/data/test_mixing.py): the rows of the run, and with ``planned`` every
    block's content, are fixed by ``seed``. Their order is fixed only with ``preserve_order`` (sets
    ``ds.context.execution_options.preserve_order``); without it a read task that finishes early
    overtakes. Ray Train replaces a dataset's execution options with the driver's
    ``DataContext`` ones unless ``DataConfig(execution_options=...)`` says otherwise, and its
    ``streaming_split`` hands blocks to workers in arrival order, so exact per-worker order needs both.
    """
    if num_rows < 1:
        raise ValueError(f"num_rows must be >= 1, got {num_rows}")
    if block_rows < 1 or window_rows < 1:
        raise ValueError(f"block_rows and window_rows must be >= 1, got {block_rows} and {window_rows}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r} is not one of {STRATEGIES}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0 (numpy seeds), got {seed}")
    if not 0 <= start_row < num_rows:
        raise ValueError(f"start_row must be in [0, num_rows={num_rows}), got {start_row}")
    if start_row and strategy != "planned":
        raise ValueError(f"start_row (resume) needs strategy='planned', got {strategy!r}")
    if columns is not None and "language" not in columns:
        columns = [*columns, "language"]
    weights = normalize_weights(corpus, weights)
    if strategy == "mix":
        ds = _build_block_mix(
            corpus, weights, num_rows=num_rows, seed=seed, block_rows=block_rows, columns=columns
        )
    else:
        plan = MixPlan.build(corpus, weights, num_rows=num_rows, seed=seed, window_rows=window_rows)
        source = _PlannedMix(plan, start_row, columns)
        # One read task per TASK_WINDOWS windows, one block per window: without the override Ray splits
        # reads to reach its default parallelism.
        ds = ray.data.read_datasource(source, override_num_blocks=source.num_tasks())
    ds.context.execution_options.preserve_order = preserve_order
    return ds


class MixStats:
    """Realized language counts over the batches a consumer drew (for reporting the mix as trained)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.batches = 0
        self._languages_in_batches = 0

    def update(self, batch) -> None:
        """Count one batch: a dict with a ``language`` column, or the language codes themselves."""
        languages = batch["language"] if isinstance(batch, Mapping) else batch
        values, n = np.unique(np.asarray(languages).astype(str), return_counts=True)
        self.counts.update(dict(zip(values.tolist(), n.tolist(), strict=True)))
        self.batches += 1
        self._languages_in_batches += len(values)

    @property
    def rows(self) -> int:
        return sum(self.counts.values())

    def fractions(self) -> dict[str, float]:
        total = self.rows
        return {lang: n / total for lang, n in sorted(self.counts.items())} if total else {}

    @property
    def mean_languages_per_batch(self) -> float:
        return self._languages_in_batches / self.batches if self.batches else 0.0

    def max_abs_error(self, weights: Mapping[str, float]) -> float:
        """Largest |realized - target| fraction over the languages in either ``weights`` or the counts."""
        total = sum(weights.values())
        got = self.fractions()
        return max(
            abs(got.get(lang, 0.0) - weights.get(lang, 0.0) / total) for lang in set(got) | set(weights)
        )
