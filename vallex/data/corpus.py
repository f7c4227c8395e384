"""A prepared corpus on disk, opened and checked before any Ray work starts.

``PreparedCorpus.open(path)`` reads ``manifest.json`` and ``symbols.json`` and checks what would
otherwise fail late and far away (inside a Ray task, mid-training): every listed shard exists, every
shard footer has ``SHARD_SCHEMA``, and the manifest was written against the same symbol table that
sits beside it. Only Parquet footers are read, so opening a large corpus costs milliseconds per shard.

The corpus may be a local folder or a URI (``s3://bucket/prefix``, ``gs://...``); shard paths are
then URIs too, which pyarrow opens wherever they are read (the driver, Ray Data's read tasks).
"""

from __future__ import annotations

import json
import os
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


def _check_shard(shard: str, manifest_path: str, lang: str) -> None:
    if not is_file(shard):
        raise CorpusError(
            f"{manifest_path}: languages.{lang} lists {shard}, which does not exist; "
            "the corpus was moved or partly deleted: re-run ray_jobs/prepare.py"
        )
    # Footer only: no row data is read here.
    check_schema(pq.read_schema(shard), shard)


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
        symbols = _require_key(table, "symbols", symbols_path)
        # The ids in every shard index this table: a different version means a different id mapping.
        want, got = (
            _require_key(manifest, "symbols_version", manifest_path),
            _require_key(table, "version", symbols_path),
        )
        if want != got:
            raise CorpusError(
                f"{manifest_path}: shards were written with symbols_version {want} but {symbols_path} is "
                f"version {got}; restore the matching symbols.json or re-run ray_jobs/prepare.py"
            )
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
            with ThreadPoolExecutor(max_workers=8) as pool:  # one round trip or two each on a bucket
                list(
                    pool.map(partial(_check_shard, manifest_path=manifest_path, lang=lang), self.shards(lang))
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
    """What a worker needs to read its share of ``split`` itself (:func:`read_split_share`): shard
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


def read_split_share(source: dict, rank: int, world: int) -> dict[str, pa.Table]:
    """Rank ``rank``'s share of each language's ``split`` rows: rows ``rank, rank + world, ...`` of the
    first ``max_rows`` (0: all) in :meth:`PreparedCorpus.read_split`'s order (shards in manifest order,
    rows in file order), so the ranks' shares partition exactly the rows one driver-side read would give.

    Reads the ``split`` column of each shard, then only the row groups holding this rank's rows, and
    stops at the shard where the language's cap is reached: a worker holds its own share, never the
    whole split."""
    split, cap = source["split"], source["max_rows"] or None
    out = {}
    for lang, paths in source["shards"].items():
        parts, seen = [], 0  # seen: split rows in earlier shards (the global index of this shard's first)
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
            keep = index % world == rank
            if cap is not None:
                keep &= index < cap
            seen += len(hits)
            rows = hits[keep]
            if not len(rows):
                continue
            sizes = [file.metadata.row_group(g).num_rows for g in range(file.metadata.num_row_groups)]
            starts = np.cumsum([0, *sizes])
            group_of = np.searchsorted(starts, rows, side="right") - 1
            groups = np.unique(group_of)
            table = file.read_row_groups(groups.tolist())
            offset = np.cumsum([0, *(sizes[g] for g in groups)])  # first row of each group in ``table``
            parts.append(table.take(offset[np.searchsorted(groups, group_of)] + rows - starts[group_of]))
        out[lang] = pa.concat_tables(parts) if parts else SHARD_SCHEMA.empty_table()
    return out
