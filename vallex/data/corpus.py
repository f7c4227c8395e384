"""A prepared corpus on disk, opened and checked before any Ray work starts.

``PreparedCorpus.open(path)`` reads ``manifest.json`` and ``symbols.json`` and checks what would
otherwise fail late and far away (inside a Ray task, mid-training): every listed shard exists, every
shard footer has ``SHARD_SCHEMA``, every language has validation rows, and the manifest was written
against the symbol table that sits beside it (same version and fingerprint: a table reordered,
truncated or edited by hand would give every id in the shards another meaning). Only Parquet footers
are read, so opening a large corpus costs milliseconds per shard.

``manifest.json`` is the commit record of a preparation: it is written last and names the symbol
table (version, fingerprint, size) and each shard's job fingerprint. A preparation that failed after
saving a grown ``symbols.json`` but before its manifest leaves a table that *extends* the committed one
(the table is append-only): the corpus then opens as committed, with the table's first
``num_symbols`` symbols. Shards rewritten by such a run no longer match their manifest entry and are
refused.

The corpus may be a local folder or a URI (``s3://bucket/prefix``, ``gs://...``); shard paths are
then URIs too, which pyarrow opens wherever they are read (the driver, Ray Data's read tasks).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property, partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from vallex.data.schema import (
    MANIFEST_NAME,
    SHARD_FORMAT_VERSION,
    SHARD_SCHEMA,
    SPLITS,
    SYMBOLS_NAME,
    check_schema,
)
from vallex.files import filesystem, is_file, is_uri, join, read_failure, read_text
from vallex.text.symbols import SymbolTable, SymbolTableError, symbols_fingerprint

log = logging.getLogger("vallex.corpus")


class CorpusError(ValueError):
    """A prepared corpus is missing, incomplete or inconsistent (names the file and what is wrong)."""


def _read_json(root: str, name: str) -> dict:
    path = join(root, name)
    try:
        if not is_file(path):
            raise CorpusError(
                f"{path} not found; is {root} a prepared corpus? Run ray_jobs/prepare.py to write one"
            )
        data = json.loads(read_text(path))
    except OSError as e:
        raise CorpusError(read_failure(path, e)) from None
    except json.JSONDecodeError as e:
        raise CorpusError(
            f"{path}: not valid JSON ({e.msg}, line {e.lineno}); re-run ray_jobs/prepare.py"
        ) from None
    if not isinstance(data, dict):
        raise CorpusError(f"{path}: must hold a JSON object, got {type(data).__name__}")
    return data


def _require_key(data: dict, key: str, path: str):
    if key not in data:
        raise CorpusError(
            f"{path}: key {key!r} is missing (found {sorted(data)}); re-run ray_jobs/prepare.py"
        )
    return data[key]


def _check_shard(
    shard: str, job: str | None, *, manifest_path: str, lang: str, symbols_version
) -> dict | None:
    """Check one shard's footer against its manifest entry; returns its split counts when the footer
    records them (shards written by ray_jobs/prepare.py do), else None."""
    if not is_file(shard):
        raise CorpusError(
            f"{manifest_path}: languages.{lang} lists {shard}, which does not exist; "
            "the corpus was moved or partly deleted: re-run ray_jobs/prepare.py"
        )
    # Footer only: no row data is read here.
    schema = pq.read_schema(shard)
    check_schema(schema, shard)
    md = schema.metadata or {}
    written = md.get(b"vallex_symbols_version")
    if written is not None and isinstance(symbols_version, int) and int(written) > symbols_version:
        raise CorpusError(
            f"{shard}: written with symbol table version {int(written)}, newer than the version "
            f"{symbols_version} that {manifest_path} commits: a preparation rewrote it and did not finish; "
            "re-run ray_jobs/prepare.py to complete it"
        )
    if job is not None and md.get(b"vallex_job", b"").decode() != job:
        raise CorpusError(
            f"{shard}: not the shard {manifest_path} lists (its job fingerprint differs): a preparation "
            "rewrote it and did not finish; re-run ray_jobs/prepare.py to complete it"
        )
    try:
        splits = json.loads(md[b"vallex_stats"])["splits"]
        return {s: int(splits.get(s, 0)) for s in SPLITS}
    except (KeyError, ValueError, TypeError, AttributeError):
        return None


def _committed_symbols(manifest: dict, table: dict, manifest_path: str, symbols_path: str) -> list[str]:
    """The symbol list the manifest's shards were written with, checked against ``symbols.json``."""
    try:
        loaded = SymbolTable.from_json(table, symbols_path)  # a stored fingerprint is checked here
    except SymbolTableError as e:
        raise CorpusError(f"{e}; it does not match {manifest_path}") from None
    symbols = loaded.symbols
    want_version = _require_key(manifest, "symbols_version", manifest_path)
    want_fp, want_n = manifest.get("symbols_fingerprint"), manifest.get("num_symbols")
    have = f"version {loaded.version}, {len(symbols)} symbols, {loaded.fingerprint[:19]}"
    wanted = f"version {want_version}, {want_n if want_n is not None else '?'} symbols, {str(want_fp)[:19]}"
    if want_version == loaded.version and (want_fp is None or want_fp == loaded.fingerprint):
        if want_n is None or want_n == len(symbols):
            return symbols
    elif (
        want_fp is not None
        and isinstance(want_n, int)
        and loaded.version > want_version
        and len(symbols) > want_n
        and symbols_fingerprint(symbols[:want_n]) == want_fp
    ):
        # An append-only extension of the committed table: a preparation saved it and failed before
        # its manifest. The committed shards use ids < want_n only, which mean what they meant.
        log.warning(
            "%s (%s) extends the table %s commits (%s): a preparation stopped before finishing; using "
            "the first %d symbols. Re-run ray_jobs/prepare.py to complete it",
            symbols_path,
            have,
            manifest_path,
            wanted,
            want_n,
        )
        return symbols[:want_n]
    differs = (
        f"is version {loaded.version}"
        if loaded.version != want_version
        else "holds another table of that version"
    )
    raise CorpusError(
        f"{manifest_path}: shards were written with symbols_version {want_version} but {symbols_path} "
        f"{differs} ({have}; the manifest records {wanted}). A symbols.json edited, reordered or "
        "truncated by hand, or copied from another corpus, would give the ids in the shards other "
        "meanings: restore the symbols.json written with these shards, or re-run ray_jobs/prepare.py "
        "into a new folder"
    )


def _count_split_groups(path: str, split: str) -> list[int]:
    """Rows of ``split`` in each Parquet row group of ``path`` (reads the ``split`` column only)."""
    file = pq.ParquetFile(path)
    column = file.read(columns=["split"])["split"]
    hits = pc.equal(column, split).to_numpy(zero_copy_only=False)
    sizes = [file.metadata.row_group(g).num_rows for g in range(file.metadata.num_row_groups)]
    bounds = np.cumsum([0, *sizes])
    return [int(hits[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


@dataclass(frozen=True)
class PreparedCorpus:
    """An opened, checked prepared corpus. Build it with :meth:`open`."""

    root: str  # an absolute local path or a URI (s3://bucket/prefix)
    manifest: dict
    symbols: list[str]
    _shard_rows_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def open(cls, path: str | os.PathLike) -> PreparedCorpus:
        """Open the corpus in ``path``: a local folder or a URI (``s3://bucket/prefix``)."""
        root = str(path).rstrip("/") if is_uri(path) else os.path.realpath(os.path.expanduser(path))
        manifest_path = join(root, MANIFEST_NAME)
        symbols_path = join(root, SYMBOLS_NAME)
        manifest = _read_json(root, MANIFEST_NAME)
        table = _read_json(root, SYMBOLS_NAME)

        fmt = _require_key(manifest, "format", manifest_path)
        if fmt != SHARD_FORMAT_VERSION:
            raise CorpusError(
                f"{manifest_path}: format {fmt} but this vallex reads format {SHARD_FORMAT_VERSION}; "
                "re-run ray_jobs/prepare.py with this version"
            )
        _require_key(table, "symbols", symbols_path)
        _require_key(table, "version", symbols_path)
        # The ids in every shard index this table: another table (version, order, length) gives them
        # other meanings.
        symbols = _committed_symbols(manifest, table, manifest_path, symbols_path)
        for key in ("codec", "languages"):
            _require_key(manifest, key, manifest_path)
        if not manifest["languages"]:
            raise CorpusError(
                f"{manifest_path}: lists no languages; re-run ray_jobs/prepare.py with some data"
            )

        corpus = cls(root=root, manifest=manifest, symbols=list(symbols))
        corpus._check_shards()
        return corpus

    def _check_shards(self) -> None:
        manifest_path = join(self.root, MANIFEST_NAME)
        for lang in self.languages:
            entry = self.manifest["languages"][lang]
            for key in ("shards", "utterances"):
                if key not in entry:
                    raise CorpusError(f"{manifest_path}: languages.{lang}.{key} is missing")
            if not entry["shards"]:
                raise CorpusError(f"{manifest_path}: languages.{lang} lists no shards")
            jobs = entry.get("shard_jobs", {})
            check = partial(
                _check_shard,
                manifest_path=manifest_path,
                lang=lang,
                symbols_version=self.manifest["symbols_version"],
            )
            with ThreadPoolExecutor(max_workers=8) as pool:  # one round trip or two each on a bucket
                footers = list(pool.map(check, self.shards(lang), [jobs.get(rel) for rel in entry["shards"]]))
            counts = {s: int(entry["utterances"].get(s, 0)) for s in SPLITS}
            if all(f is not None for f in footers):
                held = {s: sum(f[s] for f in footers) for s in SPLITS}
                if held != counts:
                    raise CorpusError(
                        f"{manifest_path}: languages.{lang}.utterances is {counts} but its shards hold {held}: "
                        "the manifest and the shards are from different preparations; re-run ray_jobs/prepare.py"
                    )
            if counts["valid"] <= 0:
                raise CorpusError(
                    f"{manifest_path}: language {lang!r} has no validation utterances, so training could not "
                    "measure it (its validation loss would read 0). Give some of its rows split=valid in the "
                    "corpus manifest (or raise corpus.valid_fraction) and re-run ray_jobs/prepare.py"
                )

    @cached_property
    def languages(self) -> list[str]:
        """Language codes in the manifest, sorted (a stable order for language ids)."""
        return sorted(self.manifest["languages"])

    def _entry(self, lang: str) -> dict:
        if lang not in self.manifest["languages"]:
            raise CorpusError(
                f"{join(self.root, MANIFEST_NAME)}: no language {lang!r}; this corpus has {self.languages}"
            )
        return self.manifest["languages"][lang]

    def shards(self, lang: str) -> list[str]:
        """Absolute paths (or URIs) of ``lang``'s shards, in manifest order."""
        return [join(self.root, rel) for rel in self._entry(lang)["shards"]]

    def counts(self, split: str = "train") -> dict[str, int]:
        """Utterances per language in ``split`` (from the manifest, no data read)."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {SPLITS}")
        return {lang: int(self._entry(lang)["utterances"].get(split, 0)) for lang in self.languages}

    @property
    def codec(self) -> dict:
        return dict(self.manifest["codec"])

    @property
    def num_codebooks(self) -> int:
        return int(self.manifest["codec"]["num_codebooks"])

    @property
    def num_symbols(self) -> int:
        return len(self.symbols)

    def shard_rows(self, lang: str, split: str = "train") -> list[int]:
        """Rows of ``split`` in each of ``lang``'s shards (reads only the ``split`` column; cached).

        Checked against the manifest's count, since a planner that trusts a wrong count would ask a
        shard for rows it does not have.
        """
        return [sum(groups) for groups in self.group_rows(lang, split)]

    def group_rows(self, lang: str, split: str = "train") -> list[list[int]]:
        """Rows of ``split`` in each Parquet row group of each of ``lang``'s shards (manifest order;
        reads only the ``split`` column; cached; checked against the manifest's count). The mixer reads
        row groups, not whole shards, so it needs to know where each group's rows are."""
        key = (lang, split)
        if key not in self._shard_rows_cache:
            with ThreadPoolExecutor(max_workers=8) as pool:  # footers + one tiny column: I/O bound
                groups = list(pool.map(partial(_count_split_groups, split=split), self.shards(lang)))
            got, want = sum(map(sum, groups)), self.counts(split)[lang]
            if got != want:
                raise CorpusError(
                    f"{join(self.root, MANIFEST_NAME)}: languages.{lang}.utterances.{split} is {want} but its "
                    f"shards hold {got} {split} rows; re-run ray_jobs/prepare.py"
                )
            self._shard_rows_cache[key] = groups
        return [list(g) for g in self._shard_rows_cache[key]]

    def read_split(self, lang: str, split: str, columns: list[str] | None = None) -> pa.Table:
        """All of ``lang``'s rows in ``split`` as one table. Meant for validation sets, which are small;
        training reads stream through :func:`vallex.data.mixing.build_mixed_dataset` instead."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {SPLITS}")
        fs, root = filesystem(self.root)  # a dataset takes paths inside one filesystem, not URIs
        paths = [f"{root}/{rel}" for rel in self._entry(lang)["shards"]]
        dataset = pads.dataset(paths, format="parquet", schema=SHARD_SCHEMA, filesystem=fs)
        return dataset.to_table(columns=columns, filter=pads.field("split") == split)


def split_source(corpus: PreparedCorpus, languages: list[str], split: str, max_rows: int = 0) -> dict:
    """What a worker needs to read ``split`` itself (:func:`read_split_rows`): shard
    paths per language and the per-language row cap (0 = every row). A few strings per shard, so
    nothing but paths travels from the driver to the workers."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    if max_rows < 0:
        raise ValueError(f"max_rows must be >= 0 (0 = every row), got {max_rows}")
    return {
        "split": split,
        "max_rows": int(max_rows),
        "shards": {lang: corpus.shards(lang) for lang in languages},
    }


def read_split_rows(
    source: dict, columns: list[str] | None = None, positions: dict[str, np.ndarray] | None = None
) -> dict[str, pa.Table]:
    """Each language's ``split`` rows, the first ``max_rows`` (0: all) in :meth:`PreparedCorpus.read_split`'s
    order (shards in manifest order, rows in file order): the same rows one driver-side read would give.

    Reads the ``split`` column of each shard, then only the row groups holding wanted rows, and stops at
    the shard where the language's cap is reached. ``columns``: only these (None: all). ``positions``: per
    language, only these positions in the capped split (sorted; a language not listed: every row), so
    only their row groups are read: a Train worker reads its own block this way
    (:func:`read_rank_rows`)."""
    split, cap = source["split"], source["max_rows"] or None
    out = {}
    for lang, paths in source["shards"].items():
        parts, seen = [], 0  # seen: split rows in earlier shards (the global index of this shard's first)
        wanted = positions.get(lang) if positions is not None else None
        for path in paths:
            if cap is not None and seen >= cap:
                break
            try:
                file = pq.ParquetFile(path)
                hits = np.flatnonzero(
                    pc.equal(file.read(columns=["split"])["split"], split).to_numpy(zero_copy_only=False)
                )
            except OSError as e:
                raise CorpusError(read_failure(path, e)) from None
            index = seen + np.arange(len(hits))
            keep = index < cap if cap is not None else np.ones(len(hits), dtype=bool)
            if wanted is not None:
                keep &= np.isin(index, wanted)
            seen += len(hits)
            rows = hits[keep]
            if not len(rows):
                continue
            sizes = [file.metadata.row_group(g).num_rows for g in range(file.metadata.num_row_groups)]
            starts = np.cumsum([0, *sizes])
            group_of = np.searchsorted(starts, rows, side="right") - 1
            groups = np.unique(group_of)
            table = file.read_row_groups(groups.tolist(), columns=columns)
            offset = np.cumsum([0, *(sizes[g] for g in groups)])  # first row of each group in ``table``
            parts.append(table.take(offset[np.searchsorted(groups, group_of)] + rows - starts[group_of]))
        empty = SHARD_SCHEMA.empty_table()
        out[lang] = pa.concat_tables(parts) if parts else empty.select(columns or empty.column_names)
    return out


# What every rank reads of every validation row: text gain's derangement (phonemes) and the synthesis
# plan (speaker) cover the whole split; frames are a few bytes.
LIGHT_COLUMNS = ["phonemes", "speaker", "frames"]


def rank_block(n: int, rank: int, world: int) -> np.ndarray:
    """The contiguous block of ``n`` rows that ``rank`` of ``world`` scores (sizes differ by at most 1)."""
    return np.arange(n * rank // world, n * (rank + 1) // world)


def read_rank_rows(
    source: dict, rank: int, world: int, extra: Callable[[dict], dict] | None = None
) -> dict[str, pa.Table]:
    """Each language's capped ``split`` as a full-length table in :func:`read_split_rows`'s order, of which
    this rank reads only: :data:`LIGHT_COLUMNS` of every row, and every column of its
    :func:`rank_block` and of the rows ``extra(light tables)`` lists per language (the few it
    synthesizes); the other rows' other columns are null. So a worker reads the row groups of its
    block, not the whole split (the light columns' chunks of the others aside)."""
    light = read_split_rows(source, columns=LIGHT_COLUMNS)
    need = {lang: rank_block(t.num_rows, rank, world) for lang, t in light.items()}
    for lang, more in (extra(light) if extra is not None else {}).items():
        need[lang] = np.union1d(need[lang], np.asarray(list(more), dtype=np.int64))
    full = read_split_rows(source, positions=need)
    out = {}
    for lang, t in light.items():
        at = np.full(t.num_rows, -1, dtype=np.int64)
        at[need[lang]] = np.arange(len(need[lang]))
        index = pa.array(at, mask=at < 0)  # a null index takes a null
        cols = [
            t.column(c) if c in LIGHT_COLUMNS else full[lang].column(c).take(index)
            for c in SHARD_SCHEMA.names
        ]
        out[lang] = pa.table(cols, names=SHARD_SCHEMA.names)
    return out
