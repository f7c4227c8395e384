"""Data preparation on Ray: utterances -> phoneme ids + EnCodec codes -> per-language Parquet shards.

The driver only groups the input (each language's utterances in id order, cut into batches of
``rows_per_shard``) and handles one summary per batch and per shard: everything done per utterance runs
in Ray tasks and actors, so the driver's work grows with shards, not utterances, and a big language is
spread over as many workers as it has batches. Three stages, because the phoneme symbol table must be
complete before any id is written:

1. **Phonemize** (a Ray task per batch): splits, text -> espeak phoneme symbols (cached per batch in
   ``.phonemes/<lang>/batch-NNNNN.parquet``), the text filter. The rows stay in the object store; the
   driver gets counts, skips and the batch's distinct symbols, and extends ``symbols.json`` with them
   (append-only: existing ids never change).
2. **Plan** (a Ray task per shard): the shard's rows from its batches' slices, their phoneme ids, the
   job's fingerprint; a shard already written by an identical job is kept.
3. **Encode** (a pool of Ray actors, one EnCodec per actor, a GPU each when the cluster has GPUs): each
   actor takes one *shard job* (up to ``rows_per_shard`` utterances of one language), decodes and
   resamples the audio, applies the duration/silence filters, encodes, and writes its shard atomically.

Shards are deterministic in content and name (utterances sorted by id, chunked), and each carries a
fingerprint of its job in the Parquet metadata, so a re-run skips the shards already written and a
killed run resumes where it stopped (a shard is only ever renamed into place complete; temp files a
kill leaves are removed, and a file that is not a complete shard is rewritten). Every dropped utterance
is counted by reason in ``manifest.json``, which also lists each language's ``shards`` (paths) and, in
parallel, ``shard_rows`` (path -> train/valid row counts), ``shard_jobs`` (path -> job fingerprint) and
``channel_mix`` (how many kept clips were mixed to mono by which rule, see :mod:`vallex.codec.audio`).

``symbols.json`` and ``manifest.json`` commit together: the grown symbol table is saved only after every
shard is written, and the manifest, which names the table (version, fingerprint, size) and each shard's
job, last. A run that fails anywhere leaves the previous corpus openable (see :mod:`vallex.data.corpus`).
One preparation at a time owns the output folder (:mod:`vallex.locks`); a second is refused.

The output may be a local folder or a URI (``s3://bucket/prefix``, ``gs://...``): everything, the
phoneme cache included, is written there through pyarrow's filesystems (see :mod:`vallex.files`).
On an object store each file is built in memory and sent as one upload, so it appears whole or not at
all (:func:`vallex.files.write_bytes`) and no temporary file is needed there; the tasks (they write
the phoneme cache and read finished shards' footers) and the codec actors need credentials for the
bucket like the driver.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vallex.config import PrepareSection
from vallex.data.schema import (
    MANIFEST_NAME,
    ROW_GROUP_ROWS,
    SHARD_FORMAT_VERSION,
    SHARD_SCHEMA,
    SYMBOLS_NAME,
    codes_flat,
    shard_name,
)
from vallex.data.sources import Utterance
from vallex.files import (
    is_file,
    is_uri,
    join,
    list_names,
    read_failure,
    read_text,
    remove,
    write_bytes,
    write_text,
)

log = logging.getLogger("vallex.prepare")

MAX_SKIP_EXAMPLES = 5
SILENCE_PEAK = 1e-4  # a clip whose absolute peak stays below this is digital silence
TMP_MARK = ".tmp-"  # a local shard being written is ".<name>.tmp-<pid>", renamed into place when complete


class PrepareError(RuntimeError):
    """Preparation cannot produce a usable corpus (names the language and why)."""


def _fingerprint(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


class SkipCounter:
    """Counts dropped utterances by reason, keeping a few example ids (and, for failures, what the error
    said: ``errors``) for the report."""

    def __init__(self, data: dict | None = None):
        self.data: dict[str, dict] = {k: _copy_entry(v) for k, v in (data or {}).items()}

    def add(self, reason: str, utt_id: str, error: str | None = None) -> None:
        entry = self.data.setdefault(reason, {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < MAX_SKIP_EXAMPLES:
            entry["examples"].append(utt_id)
            if error is not None:
                entry.setdefault("errors", []).append(f"{utt_id}: {error[:300]}")

    def merge(self, other: dict) -> None:
        for reason, entry in other.items():
            mine = self.data.setdefault(reason, {"count": 0, "examples": []})
            mine["count"] += entry["count"]
            mine["examples"] = (mine["examples"] + entry["examples"])[:MAX_SKIP_EXAMPLES]
            if entry.get("errors"):
                mine["errors"] = (mine.get("errors", []) + entry["errors"])[:MAX_SKIP_EXAMPLES]

    @property
    def total(self) -> int:
        return sum(e["count"] for e in self.data.values())


def _copy_entry(entry: dict) -> dict:
    out = {"count": entry["count"], "examples": list(entry["examples"])}
    if entry.get("errors"):
        out["errors"] = list(entry["errors"])
    return out


def assign_splits(utts: list[Utterance], valid_fraction: float, seed: int) -> list[Utterance]:
    """Give utterances without a split one, by a seeded hash of the id (stable as the corpus grows)."""
    out = []
    for u in utts:
        if u.split is None:
            h = int(hashlib.sha1(f"{seed}:{u.id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
            u = dataclasses.replace(u, split="valid" if h < valid_fraction else "train")
        out.append(u)
    return out


# ------------------------------------------------------------------------------------------------
# Pass 1: phonemize (Ray tasks, one per batch of one language's utterances)

PHONEME_CACHE = ".phonemes"  # <lang>/batch-NNNNN.parquet: text -> symbols of earlier runs, per input batch
LEGACY_PHONEME_CACHE = ".phonemes.parquet"  # the one-file cache of earlier versions: no longer read, removed
PHONEMIZER_TEXTS = 256  # texts per phonemizer call
UTTERANCE_KEYS = ("id", "audio", "text", "language", "speaker", "split")


def _phoneme_key(language: str, text: str, context: str) -> str:
    """Cache key: the text, its language and everything else that decides its phonemes (``context``)."""
    return hashlib.sha1(f"{context}\x1f{language}\x1f{text}".encode()).hexdigest()


def _phonemizer_context(phonemizer) -> str:
    """The phonemizer's settings and the espeak-ng build: a change in either invalidates the cache."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        espeak = version("espeakng-loader")
    except PackageNotFoundError:
        espeak = "unknown"
    return json.dumps({"settings": phonemizer.__getstate__(), "espeakng-loader": espeak}, sort_keys=True)


def _write_parquet(table: pa.Table, path: str, row_group_rows: int | None = None) -> None:
    """Write a Parquet file readers only ever see whole. To a URI: written into memory first, then
    sent in one upload (:func:`vallex.files.write_bytes`), so a writer error creates no object; pyarrow
    would otherwise upload a partial file when the error closes its stream. Locally: a temporary file
    beside ``path`` renamed into place. ``row_group_rows``: Parquet row group size (None: pyarrow's)."""
    if is_uri(path):
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer, row_group_size=row_group_rows)
        write_bytes(path, buffer.getvalue())
        return
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    hidden = final.name if final.name.startswith(".") else f".{final.name}"
    tmp = final.with_name(f"{hidden}{TMP_MARK}{os.getpid()}")
    pq.write_table(table, tmp, row_group_size=row_group_rows)
    os.replace(tmp, final)


def _read_phoneme_cache(path: str | None) -> dict[str, list[str]]:
    if path is None or not is_file(path):
        return {}
    try:
        table = pq.read_table(path)
        return dict(zip(table.column("key").to_pylist(), table.column("symbols").to_pylist(), strict=True))
    except (pa.ArrowInvalid, OSError, KeyError) as e:  # a damaged cache costs a re-phonemization, no more
        log.warning("ignoring the phoneme cache %s (%s); phonemizing its texts again", path, e)
        return {}


def _write_phoneme_cache(path: str, entries: dict[str, list[str]]) -> None:
    table = pa.table(
        {"key": list(entries), "symbols": list(entries.values())},
        schema=pa.schema([("key", pa.string()), ("symbols", pa.list_(pa.string()))]),
    )
    _write_parquet(table, path)  # a reader sees the old cache or the new one, never half of one


def _phoneme_cache_path(out: str, language: str, index: int) -> str:
    return join(out, PHONEME_CACHE, language, f"batch-{index:05d}.parquet")


def _add_skip(skips: dict, reason: str, position: int, utt_id: str) -> None:
    entry = skips.setdefault(reason, {"count": 0, "examples": []})
    entry["count"] += 1
    entry["examples"].append((position, utt_id))


def phonemize_batch(
    batch: list[tuple[int, Utterance]],
    language: str,
    phonemizer,
    context: str,
    cache: str | None,
    valid_fraction: float,
    seed: int,
) -> tuple[dict, list[dict]]:
    """One batch of one language's utterances, in id order, each with its position in the input:
    (summary, ready rows). Runs in a Ray task, so that the driver's work grows with batches, not rows.

    Each row gets its split (:func:`assign_splits`) and its phoneme symbols, from the batch's cache file
    ``cache`` (written by an earlier run over the same batch) or the phonemizer; the cache file is then
    rewritten to hold exactly this batch's texts. A row with an empty text, or one that yields no
    phoneme, is a counted skip. ``ready``: the other rows as dicts (:data:`UTTERANCE_KEYS` + ``symbols``).
    The summary holds what the driver needs: counts, the distinct symbols (for the symbol table) and
    the skips, with the input positions of the first few examples (so that the report names the first
    ones of the input, as a single pass over it would).
    """
    utts = assign_splits([u for _, u in batch], valid_fraction, seed)
    known = _read_phoneme_cache(cache)
    keys = [_phoneme_key(language, u.text, context) if u.text.strip() else None for u in utts]
    todo = [i for i, key in enumerate(keys) if key is not None and key not in known]
    fresh: dict[int, list[str]] = {}
    for start in range(0, len(todo), PHONEMIZER_TEXTS):
        chunk = todo[start : start + PHONEMIZER_TEXTS]
        fresh.update(zip(chunk, phonemizer([utts[i].text for i in chunk], language), strict=True))
    entries: dict[str, list[str]] = {}
    skips: dict[str, dict] = {}
    distinct: set[str] = set()
    ready = []
    for i, ((position, _), u, key) in enumerate(zip(batch, utts, keys, strict=True)):
        if key is None:
            _add_skip(skips, "empty_text", position, u.id)
            continue
        phones = list(fresh[i] if i in fresh else known[key])
        entries[key] = phones
        if not phones:
            _add_skip(skips, "unphonemizable_text", position, u.id)
            continue
        distinct.update(phones)
        ready.append({**{k: getattr(u, k) for k in UTTERANCE_KEYS}, "symbols": phones})
    if cache is not None and (todo or entries.keys() != known.keys()):
        _write_phoneme_cache(cache, entries)
    for entry in skips.values():
        entry["examples"] = sorted(entry["examples"])[:MAX_SKIP_EXAMPLES]
    summary = {
        "input_rows": len(batch),
        "ready": len(ready),
        "symbols": sorted(distinct),
        "skips": skips,
        "phonemized": len(todo),
        "cached": sum(k is not None for k in keys) - len(todo),
    }
    return summary, ready


def _merge_batch_skips(summaries: list[dict]) -> SkipCounter:
    """One language's text skips from its batches' summaries: counts summed, the examples the first
    ones of the input, reasons in the order they first occur there (what one pass over the input gives)."""
    merged: dict[str, dict] = {}
    for s in summaries:
        for reason, entry in s["skips"].items():
            mine = merged.setdefault(reason, {"count": 0, "examples": []})
            mine["count"] += entry["count"]
            mine["examples"] = sorted(mine["examples"] + [tuple(e) for e in entry["examples"]])
            mine["examples"] = mine["examples"][:MAX_SKIP_EXAMPLES]
    order = sorted(merged, key=lambda reason: merged[reason]["examples"][0][0])
    return SkipCounter(
        {
            r: {"count": merged[r]["count"], "examples": [uid for _, uid in merged[r]["examples"]]}
            for r in order
        }
    )


def _shard_pieces(ready_counts: list[int], rows_per_shard: int) -> list[list[tuple[int, int, int]]]:
    """Shard k of a language holds its ready rows k * rows_per_shard onwards, in id order; the rows come
    in batches of ``ready_counts``. Per shard, its pieces: (batch, start, stop) slices of batches. At
    least one shard (empty when nothing is ready: the manifest then names the language as unusable)."""
    total = sum(ready_counts)
    shards: list[list[tuple[int, int, int]]] = [[] for _ in range(max(1, math.ceil(total / rows_per_shard)))]
    offset = 0  # ready rows before batch b
    for b, n in enumerate(ready_counts):
        row = offset
        while row < offset + n:
            k = row // rows_per_shard
            stop = min(offset + n, (k + 1) * rows_per_shard)
            shards[k].append((b, row - offset, stop - offset))
            row = stop
        offset += n
    return shards


def plan_shard(spec: dict, table_symbols: list[str], *pieces: list[dict]) -> tuple[dict, dict | None]:
    """One shard's job from its pieces of phonemized rows (a Ray task): the rows with their phoneme ids,
    and the job's fingerprint; a shard already at ``spec["path"]`` with that fingerprint is reused.
    Returns (summary, job): the job (None when reused) stays in the object store for the encode pass."""
    from vallex.text.symbols import SymbolTable

    table = SymbolTable(table_symbols, spec["symbols_version"])
    payload = []
    for piece, (start, stop) in zip(pieces, spec["slices"], strict=True):
        for row in piece[start:stop]:
            payload.append({**{k: row[k] for k in UTTERANCE_KEYS}, "phonemes": table.encode(row["symbols"])})
    fingerprint = _fingerprint(
        {
            "rows": payload,
            "codec": spec["codec"],
            "min": spec["min"],
            "max": spec["max"],
            "format": SHARD_FORMAT_VERSION,
        }
    )
    path = spec["path"]
    if is_file(path):
        job, stats = read_shard_stats(path)
        if job == fingerprint:
            return {"path": path, "reused": True, "job": job, "stats": stats, "rows": len(payload)}, None
    job = {
        "language": spec["language"],
        "index": spec["index"],
        "path": path,
        "rows": payload,
        "fingerprint": fingerprint,
        "symbols_version": spec["symbols_version"],
    }
    return {"path": path, "reused": False, "rows": len(payload)}, job


# ------------------------------------------------------------------------------------------------
# Pass 2: decode, filter, encode, write one shard per job (runs inside Ray actors)


class ShardEncoder:
    """A Ray actor: one codec model per actor, one shard job per :meth:`write` call."""

    def __init__(self, settings: dict):
        """``settings``: codec, prepared_dir, min_duration, max_duration, codec_batch_size."""
        from vallex.codec import open_tokenizer

        # A fitted codec (mel_rvq) loads its tables from the prepared folder, checked against their sha256.
        self.tokenizer = open_tokenizer(settings["codec"], settings["prepared_dir"])
        self.min_duration = settings["min_duration"]
        self.max_duration = settings["max_duration"]
        self.codec_batch_size = settings["codec_batch_size"]

    def write(self, job: dict) -> dict:
        """Write ``job``'s shard; returns its path, job fingerprint and stats (what its metadata holds)."""
        return {"path": job["path"], "job": job["fingerprint"], "stats": self._write_shard(job)}

    def _load(self, rows: list[dict], skips: SkipCounter) -> list[tuple[dict, np.ndarray, float, str]]:
        kept = []
        for row in rows:
            item = load_for_codec(row, self.min_duration, self.max_duration, skips)
            if item is not None:
                kept.append(item)
        return kept

    def _encode(self, kept: list, skips: SkipCounter) -> tuple[list, list[np.ndarray]]:
        """Codes of the kept clips, batched; a batch that fails is encoded clip by clip, and a clip
        that fails alone is a counted skip (``encode_failed``), never a failed job."""
        out_items, codes = [], []
        for i in range(0, len(kept), self.codec_batch_size):
            batch = kept[i : i + self.codec_batch_size]
            try:
                codes.extend(self.tokenizer.encode([w for _, w, _, _ in batch]))
                out_items.extend(batch)
                continue
            except Exception:
                pass
            for item in batch:
                try:
                    codes.extend(self.tokenizer.encode([item[1]]))
                    out_items.append(item)
                except Exception as e:
                    log.warning("skipping %s (%s): encoding failed: %r", item[0]["id"], item[0]["audio"], e)
                    skips.add("encode_failed", item[0]["id"], f"{type(e).__name__}: {e}")
        return out_items, codes

    def _write_shard(self, job: dict) -> dict:
        t0 = time.perf_counter()
        skips = SkipCounter()
        kept = self._load(job["rows"], skips)
        # Encode similar lengths together: less padding per EnCodec batch.
        kept.sort(key=lambda item: len(item[1]))
        kept, codes = self._encode(kept, skips)
        order = sorted(range(len(kept)), key=lambda i: kept[i][0]["id"])  # shard rows in id order
        cols: dict[str, list] = defaultdict(list)
        mixes: dict[str, int] = defaultdict(int)
        for i in order:
            row, _, duration, mix = kept[i]
            mixes[mix] += 1
            c = codes[i]
            cols["utt_id"].append(row["id"])
            cols["speaker"].append(row["speaker"])
            cols["language"].append(job["language"])
            cols["text"].append(row["text"])
            cols["phonemes"].append(row["phonemes"])
            cols["codes"].append(codes_flat(c))
            cols["frames"].append(int(c.shape[1]))
            cols["num_codebooks"].append(int(c.shape[0]))
            cols["duration"].append(float(duration))
            cols["split"].append(row["split"])
        stats = {
            "language": job["language"],
            "index": job["index"],
            "rows": len(order),
            "splits": {s: cols["split"].count(s) for s in ("train", "valid")},
            "frames": int(sum(cols["frames"])),
            "phonemes": int(sum(len(p) for p in cols["phonemes"])),
            "seconds": float(sum(cols["duration"])),
            "speakers": sorted(set(cols["speaker"])),
            "skipped": skips.data,
            "channel_mix": dict(sorted(mixes.items())),
            "input_rows": len(job["rows"]),
            "encode_seconds": time.perf_counter() - t0,
        }
        metadata = dict(SHARD_SCHEMA.metadata or {})
        metadata.update(
            {
                b"vallex_job": job["fingerprint"].encode(),
                b"vallex_stats": json.dumps(stats).encode(),
                b"vallex_symbols_version": str(job["symbols_version"]).encode(),
            }
        )
        schema = SHARD_SCHEMA.with_metadata(metadata)
        table = pa.Table.from_pydict({f.name: cols.get(f.name, []) for f in schema}, schema=schema)
        # Atomic: a reader never sees a half-written shard. Row groups sized for the mixer's reads.
        _write_parquet(table, job["path"], ROW_GROUP_ROWS)
        return stats


def load_for_codec(
    row: dict, min_duration: float, max_duration: float, skips: SkipCounter
) -> tuple[dict, np.ndarray, float, str] | None:
    """One utterance's audio at the codec's rate: ``(row, samples, duration, channel mix)``, or None with
    the reason counted in ``skips``. The duration comes from the header first, so a file too long is
    skipped without being decoded; decoding is capped at ``max_duration``, and whatever fails for one
    file (a decoder, the resampler, anything) is a counted skip with its reason, never a failed job."""
    from vallex.codec.audio import (
        MAX_SAMPLE_RATE,
        MIN_SAMPLE_RATE,
        AudioError,
        AudioTooLong,
        audio_info,
        read_audio,
        resample,
    )
    from vallex.codec.encodec import SAMPLE_RATE

    uid = row["id"]
    if not os.path.exists(row["audio"]):
        skips.add("missing_audio", uid)
        return None
    try:
        info = audio_info(row["audio"])
        if not MIN_SAMPLE_RATE <= info.sample_rate <= MAX_SAMPLE_RATE:
            skips.add(
                "unsupported_sample_rate",
                uid,
                f"{info.sample_rate} Hz, outside {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz",
            )
            return None
        audio = read_audio(row["audio"], max_seconds=max_duration, info=info)
    except AudioTooLong:
        skips.add("too_long", uid)
        return None
    except AudioError as e:
        skips.add("unreadable_audio", uid, str(e))
        return None
    except Exception as e:  # a decoder library's own failure: this file only
        log.warning("skipping %s (%s): decoding failed: %r", uid, row["audio"], e)
        skips.add("audio_failed", uid, f"{type(e).__name__}: {e}")
        return None
    duration = len(audio.samples) / audio.sample_rate
    if duration < min_duration:
        skips.add("too_short", uid)
        return None
    if float(np.max(np.abs(audio.samples))) < SILENCE_PEAK:
        skips.add("silent", uid)
        return None
    try:
        samples = resample(audio.samples, audio.sample_rate, SAMPLE_RATE)
    except Exception as e:
        log.warning(
            "skipping %s (%s): resampling from %d Hz failed: %r", uid, row["audio"], audio.sample_rate, e
        )
        skips.add("resample_failed", uid, f"{audio.sample_rate} Hz: {type(e).__name__}: {e}")
        return None
    return row, samples, duration, audio.mix


def read_shard_stats(path: str | os.PathLike) -> tuple[str | None, dict | None]:
    """(job fingerprint, stats) from a shard's Parquet metadata, or (None, None) if the file is not a
    complete shard: unreadable or cut short (no footer), no vallex metadata, or a row count that is not
    the one its stats recorded. A re-run rewrites such a shard instead of taking it as finished."""
    try:
        meta = pq.read_metadata(path)
        md = meta.schema.to_arrow_schema().metadata or {}
    except (OSError, pa.ArrowException, ValueError):
        return None, None
    if b"vallex_job" not in md or b"vallex_stats" not in md:
        return None, None
    try:
        stats = json.loads(md[b"vallex_stats"])
    except json.JSONDecodeError:
        return None, None
    if stats.get("rows") != meta.num_rows:
        return None, None
    return md[b"vallex_job"].decode(), stats


# ------------------------------------------------------------------------------------------------
# The driver


def _bar(total: int, desc: str, unit: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True, leave=True)


def _gpus_available() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def prepare_corpus(
    utts: list[Utterance],
    out_dir: str | os.PathLike,
    settings: PrepareSection,
    *,
    seed: int = 0,
    valid_fraction: float = 0.1,
    progress: bool = True,
) -> dict:
    """Prepare ``utts`` into ``out_dir``; returns the manifest (also written to ``out_dir/manifest.json``).

    ``out_dir`` is a local folder or a URI (``s3://bucket/prefix``). Languages already in ``out_dir``
    but absent from ``utts`` are kept: this is how a language is added. One preparation at a time
    owns ``out_dir`` (:mod:`vallex.locks`): a second one is refused, naming the first.
    """
    from vallex.locks import hold_lock

    if is_uri(out_dir):
        out = str(out_dir).rstrip("/")
    else:
        out = os.path.abspath(out_dir)
        os.makedirs(out, exist_ok=True)
    with hold_lock(out, f"preparation of {out}"):
        return _prepare_owned(utts, out, settings, seed, valid_fraction, progress)


def _prepare_owned(
    utts: list[Utterance],
    out: str,
    settings: PrepareSection,
    seed: int,
    valid_fraction: float,
    progress: bool,
) -> dict:
    import ray

    from vallex.codec.tokenizer import codec_summary
    from vallex.text.phonemize import Phonemizer
    from vallex.text.symbols import SymbolTable

    codec = codec_description(settings, seed)
    old_manifest = _read_json(join(out, MANIFEST_NAME))
    old_codec = (old_manifest or {}).get("codec")
    if old_manifest and _codec_config(old_codec) != codec:
        raise PrepareError(
            f"{join(out, MANIFEST_NAME)} was prepared with codec {old_codec} but this run asks for "
            f"{codec}; codes from different codecs cannot be mixed: use another output folder"
        )

    # The driver only groups the input: each language's utterances in id order, cut into batches of
    # rows_per_shard. Everything done per utterance (splits, phonemes, the skip filter, phoneme ids,
    # fingerprints, audio) runs in Ray tasks and actors; the driver handles per-batch and per-shard
    # summaries, so its work grows with shards, and a big language is spread over many workers.
    batches = _language_batches(utts, settings.rows_per_shard)
    languages = sorted(batches)
    log.info("preparing %d utterances in %s -> %s", len(utts), ", ".join(languages), out)

    # Pass 1: phonemes (cached per batch), then the shared symbol table (append-only).
    phonemizer = Phonemizer()
    summaries, ready_refs, phonemized = _phonemize_batches(
        batches, out, phonemizer, valid_fraction, seed, progress
    )
    log.info(
        "phonemes: %d utterance(s) phonemized, %d from earlier runs",
        phonemized["phonemized"],
        phonemized["cached"],
    )
    skips = {lang: _merge_batch_skips(summaries[lang]) for lang in languages}
    table = SymbolTable.load_or_new(join(out, SYMBOLS_NAME))
    # Grown in memory only: symbols.json and manifest.json are committed together at the end.
    added = table.extend(sorted({sym for lang in languages for s in summaries[lang] for sym in s["symbols"]}))

    # A codec fitted to the corpus is fitted once, before any shard, and reused by every later run here.
    if codec.get("kind") == "mel_rvq":
        codec = fitted_codec(
            out, codec, lambda: _ready_utterances(ready_refs), settings, seed, old_codec, progress
        )
    if codec.get("kind") == "mel_rvq" or not codec.get("pretrained", True):
        log.warning("%s", codec_summary(codec))

    # Pass 2: shard jobs, planned in tasks from the batches' rows; shards already written by an
    # identical job are kept.
    plans = []  # (summary ref, job ref) per shard
    table_ref = ray.put(table.symbols) if languages else None
    plan_task = ray.remote(num_returns=2)(plan_shard)
    for lang in languages:
        lang_dir = join(out, lang)
        # Half-written shards of a killed run: never read, never taken as finished; removed here.
        for name in list_names(lang_dir, f".part-*{TMP_MARK}*"):
            log.info("removing %s, left by an interrupted run", join(lang_dir, name))
            remove(join(lang_dir, name))
        shards = _shard_pieces([s["ready"] for s in summaries[lang]], settings.rows_per_shard)
        for index, pieces in enumerate(shards):
            spec = {
                "language": lang,
                "index": index,
                "path": join(lang_dir, shard_name(index)),
                "slices": [(start, stop) for _, start, stop in pieces],
                "symbols_version": table.version,
                "codec": codec,
                "min": settings.min_duration,
                "max": settings.max_duration,
            }
            plans.append(plan_task.remote(spec, table_ref, *(ready_refs[lang][b] for b, _, _ in pieces)))
        # Shards beyond this run's count are leftovers of an earlier, larger layout.
        for stale in list_names(lang_dir, "part-*.parquet")[len(shards) :]:
            log.info("removing stale shard %s", join(lang_dir, stale))
            remove(join(lang_dir, stale))

    jobs, reused, known = [], [], {}
    bar = _bar(len(plans), "plan shards", "shard", progress)
    for summary_ref, job_ref in plans:
        summary = ray.get(summary_ref)
        bar.update(1)
        if summary["reused"]:
            reused.append(summary["path"])
            known[summary["path"]] = (summary["job"], summary["stats"])
        else:
            jobs.append((job_ref, summary["rows"]))
    bar.close()
    plans.clear()
    ready_refs.clear()  # the batches' rows are in the jobs now: the object store may free them

    if reused:
        log.info("%d shard(s) already prepared, skipped", len(reused))
    if jobs:
        known.update(_run_jobs(jobs, codec, out, settings, progress))

    manifest = _build_manifest(out, languages, skips, codec, table, old_manifest, known)
    # What this run did (a re-run of finished work shows zeros).
    manifest["last_run"] = {**phonemized, "shards_written": len(jobs), "shards_reused": len(reused)}
    _commit(out, table, manifest, added)
    if is_file(join(out, LEGACY_PHONEME_CACHE)):
        log.info("removing %s: the phoneme cache is %s/ now", join(out, LEGACY_PHONEME_CACHE), PHONEME_CACHE)
        remove(join(out, LEGACY_PHONEME_CACHE))
    return manifest


def _language_batches(
    utts: list[Utterance], rows_per_shard: int
) -> dict[str, list[list[tuple[int, Utterance]]]]:
    """Language -> its utterances in id order, with their input positions, in batches of ``rows_per_shard``."""
    by_lang: dict[str, list[tuple[int, Utterance]]] = defaultdict(list)
    for position, u in enumerate(utts):
        by_lang[u.language].append((position, u))
    out = {}
    for lang, rows in by_lang.items():
        rows.sort(key=lambda r: r[1].id)
        out[lang] = [rows[i : i + rows_per_shard] for i in range(0, len(rows), rows_per_shard)]
    return out


def _phonemize_batches(
    batches: dict[str, list], out: str, phonemizer, valid_fraction: float, seed: int, progress: bool
) -> tuple[dict[str, list[dict]], dict[str, list], dict[str, int]]:
    """Pass 1 over every batch in Ray tasks: (summaries per language, refs to the ready rows per
    language, counts). The rows stay in the object store; the driver gets each batch's summary."""
    import ray

    cache_root = join(out, PHONEME_CACHE)
    for tmp in list_names(out, f"{LEGACY_PHONEME_CACHE}{TMP_MARK}*"):  # an old cache write a kill cut short
        remove(join(out, tmp))
    summaries: dict[str, list[dict]] = {}
    counts = {"phonemized": 0, "cached": 0}
    if not batches:  # nothing to do: no Ray call (which would start a local cluster)
        return summaries, {}, counts
    task = ray.remote(num_returns=2)(phonemize_batch)
    context = _phonemizer_context(phonemizer)
    phonemizer_ref = ray.put(phonemizer)
    summary_refs, ready_refs = {}, {}
    for lang, lang_batches in batches.items():
        cache_dir = join(cache_root, lang)
        for name in list_names(cache_dir, f".batch-*{TMP_MARK}*"):  # a cache write a kill cut short
            remove(join(cache_dir, name))
        # Cache files of batches this run does not have (the language shrank) would never be read again.
        for stale in list_names(cache_dir, "batch-*.parquet")[len(lang_batches) :]:
            remove(join(cache_dir, stale))
        refs = [
            task.remote(
                batch, lang, phonemizer_ref, context, _phoneme_cache_path(out, lang, b), valid_fraction, seed
            )
            for b, batch in enumerate(lang_batches)
        ]
        summary_refs[lang] = [s for s, _ in refs]
        ready_refs[lang] = [r for _, r in refs]
    bar = _bar(
        sum(len(b) for lang_batches in batches.values() for b in lang_batches), "phonemize", "utt", progress
    )
    for lang, refs in summary_refs.items():
        summaries[lang] = []
        for ref in refs:
            s = ray.get(ref)
            summaries[lang].append(s)
            counts["phonemized"] += s["phonemized"]
            counts["cached"] += s["cached"]
            bar.update(s["input_rows"])
    bar.close()
    return summaries, ready_refs, counts


def _ready_utterances(ready_refs: dict[str, list]) -> list[Utterance]:
    """Every utterance that passed the text filter, with its split, gathered on the driver: only the
    codec fit needs this (once per output folder), for its seeded sample of the training split."""
    import ray

    return [
        Utterance(**{k: row[k] for k in UTTERANCE_KEYS})
        for lang in sorted(ready_refs)
        for piece in ray.get(ready_refs[lang])
        for row in piece
    ]


def _commit(out: str, table, manifest: dict, added: list[str]) -> None:
    """Save the symbol table, then the manifest: the commit record, which names the table (version,
    fingerprint, size) and each shard's job. Until the manifest is written a reader sees the previous
    corpus whole: the old manifest and its shards, and (the table being append-only) a symbols.json
    that is the committed one or an extension of it (see :mod:`vallex.data.corpus`)."""
    if added:
        table.save(join(out, SYMBOLS_NAME))
        log.info("symbol table v%d: %d symbols (+%d new)", table.version, len(table), len(added))
    write_text(join(out, MANIFEST_NAME), json.dumps(manifest, indent=2, ensure_ascii=False))


def codec_description(settings: PrepareSection, seed: int) -> dict:
    """The manifest's ``codec`` dict this run asks for (a fitted codec's ``fitted``/``sha256`` come later)."""
    c = settings.codec
    if c.kind == "mel_rvq":
        from vallex.codec.encodec import CodecSettings
        from vallex.codec.mel_rvq import MelRVQSettings

        return MelRVQSettings(
            num_codebooks=CodecSettings(bandwidth=c.bandwidth).num_codebooks,
            n_mels=c.mel_bins,
            seed=seed,
            fit_frames=c.fit_frames,
            fit_iterations=c.fit_iterations,
            fit_utterances=c.fit_utterances,
            frame_rate=c.frame_rate,
        ).to_dict()
    from vallex.codec.encodec import CodecSettings

    return CodecSettings(
        bandwidth=c.bandwidth, pretrained=c.pretrained, checkpoint=c.checkpoint or None, seed=seed
    ).to_dict()


def _codec_config(codec: dict | None) -> dict | None:
    """A manifest's codec dict without what the fit produced (the fitted file's name and sha256)."""
    return None if codec is None else {k: v for k, v in codec.items() if k not in ("fitted", "sha256")}


def _fit_sample(ready: list[Utterance], n: int, seed: int) -> list[Utterance]:
    """Up to ``n`` training utterances, balanced across languages: each language's shuffled list (seeded)
    is taken round-robin, so a small language is not drowned by the big ones."""
    import random

    pools = []
    for lang in sorted({u.language for u in ready}):
        pool = sorted((u for u in ready if u.language == lang and u.split == "train"), key=lambda u: u.id)
        random.Random(f"vallex-codec-fit/{seed}/{lang}").shuffle(pool)
        pools.append(pool)
    out = []
    for i in range(max((len(p) for p in pools), default=0)):
        out.extend(p[i] for p in pools if i < len(p))
    return out[:n]


def fitted_codec(
    out: str,
    codec: dict,
    ready: Callable[[], list[Utterance]],
    settings: PrepareSection,
    seed: int,
    old_codec: dict | None,
    progress: bool,
) -> dict:
    """The mel_rvq codec dict with its ``fitted`` file and ``sha256``: the tables already in ``out``
    (written by an earlier run into this folder: they made its shards, so they are kept), else fitted
    now on a seeded sample of the training split (``ready()``: the usable utterances, called only
    then) and written atomically beside the shards."""
    from vallex.codec import mel_rvq
    from vallex.codec.encodec import CodecError
    from vallex.codec.tokenizer import read_location

    spec = mel_rvq.MelRVQSettings.from_dict(codec)
    path = join(out, mel_rvq.FITTED_NAME)
    if is_file(path):
        data = read_location(path)
        digest = mel_rvq.sha256(data)
        if old_codec and old_codec.get("sha256") not in (None, digest):
            raise PrepareError(
                f"{path}: sha256 {digest[:16]}... but {join(out, MANIFEST_NAME)} recorded "
                f"{old_codec['sha256'][:16]}...: the fitted codec changed since the shards were made; "
                "restore it or prepare into a new folder"
            )
        try:
            mel_rvq.load_tables(data, path, spec)
        except Exception as e:  # noqa: BLE001 - any defect means the same: not this codec's tables
            raise PrepareError(
                f"{e}; delete it (and this folder's shards) or prepare into a new folder"
            ) from None
        log.info("mel_rvq codec: reusing the tables fitted earlier in %s", path)
        return {**codec, "fitted": mel_rvq.FITTED_NAME, "sha256": digest}
    if old_codec and old_codec.get("sha256"):
        raise PrepareError(
            f"{path} is missing but {join(out, MANIFEST_NAME)} says the shards were made with it: restore it, "
            "or prepare into a new folder"
        )

    sample = _fit_sample(ready(), spec.fit_utterances, seed)
    t0 = time.perf_counter()
    wavs = []
    bar = _bar(len(sample), "codec fit: read audio", "utt", progress)
    ignored = SkipCounter()  # the encode pass counts (and reports) these same files' skips
    for u in sample:
        bar.update(1)
        # The encode pass's bounded loader: header checks, capped decoding, any failure a skip.
        item = load_for_codec(u.to_dict(), settings.min_duration, settings.max_duration, ignored)
        if item is not None:
            wavs.append(item[1])
    bar.close()
    log.info(
        "mel_rvq codec: fitting on %d training utterances (%.1f min, %s), %d frames at most",
        len(wavs),
        sum(len(w) for w in wavs) / mel_rvq.SAMPLE_RATE / 60,
        ", ".join(sorted({u.language for u in sample})),
        spec.fit_frames,
    )
    try:
        tables = mel_rvq.fit_tables(wavs, spec, progress=progress)
    except CodecError as e:
        raise PrepareError(f"{e} (prepare.codec.kind=mel_rvq; a tiny corpus can use kind=encodec)") from None
    data = mel_rvq.tables_bytes(tables, spec)
    write_bytes(path, data)  # whole or not at all; a killed fit leaves no file and the next run refits
    log.info(
        "mel_rvq codec: fitted in %.1f s (audio read included), written to %s", time.perf_counter() - t0, path
    )
    return {**codec, "fitted": mel_rvq.FITTED_NAME, "sha256": mel_rvq.sha256(data)}


def _run_jobs(
    jobs: list[tuple[Any, int]], codec: dict, out: str, settings: PrepareSection, progress: bool
) -> dict[str, tuple[str, dict]]:
    """Encode and write the shard ``jobs`` ((object ref of the job, its rows)) on a pool of
    :class:`ShardEncoder` actors; returns shard path -> (job fingerprint, stats) of each shard written."""
    import ray
    from ray.util import ActorPool

    use_gpu = _gpus_available()
    n_actors = min(settings.codec_actors, len(jobs))
    # A shard job is idempotent (its file is renamed into place whole), so an actor lost with its
    # node is restarted and its job run again; a few times, not forever (a job that kills its actor
    # every time is a bug to see, not to retry).
    encoder = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0, max_restarts=3, max_task_retries=3)(
        ShardEncoder
    )
    actors = [
        encoder.remote(
            {
                "codec": codec,
                "prepared_dir": out,
                "min_duration": settings.min_duration,
                "max_duration": settings.max_duration,
                "codec_batch_size": settings.codec_batch_size,
            }
        )
        for _ in range(n_actors)
    ]
    # Big jobs first so the pool's tail is short.
    jobs = sorted(jobs, key=lambda j: -j[1])
    total = sum(rows for _, rows in jobs)
    # The bar counts input utterances (kept or skipped), so its utt/s is the rate work gets done; the
    # postfix gives the audio kept per wall-clock second, from the start of the pool (actor start-up
    # included), in hours/s and as a multiple of real time.
    bar = _bar(total, "encode", "utt", progress)
    t0 = time.perf_counter()
    seconds = 0.0
    kept = 0
    written = {}
    try:
        pool = ActorPool(actors)
        for result in pool.map_unordered(
            lambda actor, job: actor.write.remote(job), [ref for ref, _ in jobs]
        ):
            stats = result["stats"]
            written[result["path"]] = (result["job"], stats)
            seconds += stats["seconds"]
            kept += stats["rows"]
            bar.update(stats["input_rows"])
            bar.set_postfix_str(progress_postfix(seconds, kept, time.perf_counter() - t0))
    finally:
        for actor in actors:  # their models and CPUs/GPUs go back now, not when Ray collects the handles
            ray.kill(actor)
    bar.close()
    elapsed = time.perf_counter() - t0
    log.info(
        "encoded %d of %d utterances (%.1f min of audio) in %.1f s: %.1f utt/s, %.1f audio-s/s on %d %s actor(s)",
        kept,
        total,
        seconds / 60,
        elapsed,
        kept / max(elapsed, 1e-9),
        seconds / max(elapsed, 1e-9),
        n_actors,
        "GPU" if use_gpu else "CPU",
    )
    return written


def progress_postfix(audio_seconds: float, kept: int, elapsed: float) -> str:
    """The encode bar's postfix: kept utterances/s, audio-hours/s (and x real time), hours done."""
    elapsed = max(elapsed, 1e-9)
    return (
        f"{kept / elapsed:.1f} kept utt/s, {audio_seconds / 3600 / elapsed:.4f} audio-h/s "
        f"({audio_seconds / elapsed:.1f}x real time), {audio_seconds / 3600:.3f} h done"
    )


def _build_manifest(
    out: str, languages, skips, codec, table, old_manifest: dict | None, known: dict | None = None
) -> dict:
    """The manifest from each shard's stats: ``known`` (path -> (job fingerprint, stats), what this run's
    tasks returned) or, for a shard not in it, the shard's own metadata."""
    known = known or {}
    langs_out = dict((old_manifest or {}).get("languages", {}))
    for lang in languages:
        shards = [f"{lang}/{name}" for name in list_names(join(out, lang), "part-*.parquet")]
        counter = skips[lang]
        entry = {
            "shards": [],
            "shard_rows": {},  # shard path -> {"train": n, "valid": m}
            "shard_jobs": {},  # shard path -> its job fingerprint (checked by PreparedCorpus.open)
            "channel_mix": {},  # how each kept clip's channels were mixed to mono -> clips
            "utterances": {"train": 0, "valid": 0},
            "hours": 0.0,
            "frames": 0,
            "phonemes": 0,
        }
        speakers: set[str] = set()
        for rel in shards:
            job, stats = known.get(join(out, rel)) or read_shard_stats(join(out, rel))
            if stats is None:
                raise PrepareError(
                    f"{join(out, rel)}: shard has no vallex metadata; delete it and re-run preparation"
                )
            entry["shards"].append(rel)
            entry["shard_jobs"][rel] = job
            entry["shard_rows"][rel] = {s: int(stats["splits"].get(s, 0)) for s in ("train", "valid")}
            for split, n in stats["splits"].items():
                entry["utterances"][split] += n
            entry["hours"] += stats["seconds"] / 3600
            entry["frames"] += stats["frames"]
            entry["phonemes"] += stats["phonemes"]
            speakers.update(stats["speakers"])
            counter.merge(stats["skipped"])
            for mix, n in stats.get("channel_mix", {}).items():  # absent in shards of older versions
                entry["channel_mix"][mix] = entry["channel_mix"].get(mix, 0) + n
        entry["speakers"] = len(speakers)
        entry["skipped"] = counter.data
        entry["skipped_total"] = counter.total
        if entry["utterances"]["train"] == 0:
            raise PrepareError(
                f"language {lang!r} yielded no training utterances; skipped: "
                f"{ {r: e['count'] for r, e in counter.data.items()} } (see examples in the skip report)"
            )
        if entry["utterances"]["valid"] == 0:
            raise PrepareError(
                f"language {lang!r} has no validation utterances; give some rows split=valid "
                "or raise corpus.valid_fraction"
            )
        langs_out[lang] = entry
    for lang, entry in langs_out.items():
        if "shard_rows" not in entry or "shard_jobs" not in entry:  # kept from an older manifest
            entry["shard_rows"], entry["shard_jobs"] = {}, {}
            for rel in entry["shards"]:
                job, stats = read_shard_stats(join(out, rel))
                if stats is None:
                    raise PrepareError(
                        f"{join(out, rel)}: shard of {lang!r} is unreadable; re-run preparation for it"
                    )
                entry["shard_rows"][rel] = {s: int(stats["splits"].get(s, 0)) for s in ("train", "valid")}
                entry["shard_jobs"][rel] = job
        if entry["skipped_total"]:
            log.info(
                "%s: skipped %d utterance(s): %s",
                lang,
                entry["skipped_total"],
                ", ".join(f"{r}={e['count']}" for r, e in entry["skipped"].items()),
            )
    return {
        "format": SHARD_FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "codec": codec,
        "symbols_version": table.version,
        "symbols_fingerprint": table.fingerprint,
        "num_symbols": len(table),
        "languages": dict(sorted(langs_out.items())),
    }


def _read_json(path: str) -> dict | None:
    try:
        if not is_file(path):
            return None
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise PrepareError(f"{path}: corrupt JSON ({e}); delete it to rebuild") from None
    except OSError as e:
        raise PrepareError(read_failure(path, e)) from None


def prepare_from_config(cfg, progress: bool = True) -> dict:
    """Resolve the configured corpus (the embedded demo, a manifest, an LJSpeech or a Common Voice
    folder) and prepare it."""
    from vallex.data.sources import read_corpus, read_manifest

    if cfg.corpus.source == "demo":
        from vallex.data.demo_corpus import make_demo_corpus

        manifest_path = make_demo_corpus(
            cfg.corpus_dir,
            seed=cfg.run.seed,
            languages=cfg.corpus.languages or None,
            scale=cfg.corpus.demo_scale,
            progress=progress,
        )
        utts = read_manifest(manifest_path, cfg.corpus.languages)
    else:
        utts = read_corpus(
            cfg.corpus.source,
            cfg.corpus.layout,
            language=cfg.corpus.language,
            speaker=cfg.corpus.speaker,
            languages=cfg.corpus.languages,
        )
    return prepare_corpus(
        utts,
        cfg.prepared_dir,
        cfg.prepare,
        seed=cfg.run.seed,
        valid_fraction=cfg.corpus.valid_fraction,
        progress=progress,
    )


def summary_table(manifest: dict) -> str:
    """A per-language summary of a prepared corpus for the terminal."""
    rows = [f"{'language':<10}{'train':>8}{'valid':>8}{'hours':>8}{'speakers':>10}{'skipped':>9}"]
    for lang, e in manifest["languages"].items():
        rows.append(
            f"{lang:<10}{e['utterances']['train']:>8}{e['utterances']['valid']:>8}{e['hours']:>8.3f}"
            f"{e['speakers']:>10}{e['skipped_total']:>9}"
        )
    return "\n".join(rows)
