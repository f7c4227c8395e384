"""Data preparation on Ray Data: utterances -> phoneme ids + EnCodec codes -> per-language Parquet shards.

Two passes, because the phoneme symbol table must be complete before any id is written:

1. **Phonemize** (Ray Data tasks): text -> espeak phoneme symbols. The driver collects the new symbols,
   extends ``symbols.json`` (append-only: existing ids never change) and turns symbols into ids.
2. **Encode** (Ray Data actor pool, one EnCodec per actor, a GPU each when the cluster has GPUs): each
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
all (:func:`vallex.files.write_bytes`) and no temporary file is needed there; the codec actors need
credentials for the bucket like the driver.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections import defaultdict
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
            u = Utterance(**{**u.to_dict(), "split": "valid" if h < valid_fraction else "train"})
        out.append(u)
    return out


# ------------------------------------------------------------------------------------------------
# Pass 1: phonemize


def _phonemize_batch(batch: dict[str, np.ndarray], phonemizer) -> dict[str, np.ndarray]:
    """Ray Data map_batches fn: one phonemizer call per language present in the batch."""
    langs = batch["language"]
    out = np.empty(len(langs), dtype=object)
    for lang in np.unique(langs):
        idx = np.nonzero(langs == lang)[0]
        phones = phonemizer([str(t) for t in batch["text"][idx]], str(lang))
        for i, p in zip(idx, phones, strict=True):
            out[i] = json.dumps(p, ensure_ascii=False)
    return {"id": batch["id"], "symbols": out}


PHONEME_CACHE = ".phonemes.parquet"  # text -> symbols of earlier runs, so a re-run phonemizes only new text


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
        log.warning("ignoring the phoneme cache %s (%s); phonemizing everything", path, e)
        return {}


def _write_phoneme_cache(path: str, entries: dict[str, list[str]]) -> None:
    table = pa.table(
        {"key": list(entries), "symbols": list(entries.values())},
        schema=pa.schema([("key", pa.string()), ("symbols", pa.list_(pa.string()))]),
    )
    _write_parquet(table, path)  # a reader sees the old cache or the new one, never half of one


def phonemize_all(
    utts: list[Utterance], progress: bool, cache: str | None = None
) -> tuple[dict[str, list[str]], dict[str, int]]:
    """(utterance id -> phoneme symbols ([] when the text yields none), counts), computed on Ray Data.

    With ``cache`` (a Parquet file: a local path or a URI), texts phonemized by an earlier run with the same phonemizer
    settings and espeak build are looked up instead; new results are added to it. ``counts`` says
    how many utterances were ``phonemized`` and how many came from the cache (``cached``).
    """
    import ray

    from vallex.text.phonemize import Phonemizer

    phonemizer = Phonemizer()
    context = _phonemizer_context(phonemizer)
    known = _read_phoneme_cache(cache)
    result: dict[str, list[str]] = {u.id: [] for u in utts}
    keys = {u.id: _phoneme_key(u.language, u.text, context) for u in utts if u.text.strip()}
    todo = []
    for u in utts:
        if u.id not in keys:
            continue
        if keys[u.id] in known:
            result[u.id] = list(known[keys[u.id]])
        else:
            todo.append({"id": u.id, "language": u.language, "text": u.text})
    counts = {"phonemized": len(todo), "cached": len(keys) - len(todo)}
    if not todo:
        return result, counts
    ds = ray.data.from_items(todo).map_batches(
        _phonemize_batch, fn_kwargs={"phonemizer": phonemizer}, batch_size=256, batch_format="numpy"
    )
    bar = _bar(len(todo), "phonemize", "utt", progress)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for uid, sym in zip(batch["id"], batch["symbols"], strict=True):
            result[str(uid)] = json.loads(sym)
        bar.update(len(batch["id"]))
    bar.close()
    if cache is not None:
        known.update({keys[row["id"]]: result[row["id"]] for row in todo})
        _write_phoneme_cache(cache, known)
    return result, counts


# ------------------------------------------------------------------------------------------------
# Pass 2: decode, filter, encode, write one shard per job (runs inside Ray Data actors)


class ShardEncoder:
    """A Ray Data callable class: one EnCodec model per actor, one shard job per call."""

    settings: dict = {}  # codec, prepared_dir, min_duration, max_duration, codec_batch_size (bound per run)

    def __init__(self):
        from vallex.codec import open_tokenizer

        # A fitted codec (mel_rvq) loads its tables from the prepared folder, checked against their sha256.
        self.tokenizer = open_tokenizer(self.settings["codec"], self.settings["prepared_dir"])
        self.min_duration = self.settings["min_duration"]
        self.max_duration = self.settings["max_duration"]
        self.codec_batch_size = self.settings["codec_batch_size"]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        stats = [self._write_shard(json.loads(job)) for job in batch["job"]]
        return {"stats": np.array([json.dumps(s) for s in stats], dtype=object)}

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
    from vallex.codec.tokenizer import codec_summary
    from vallex.text.symbols import SymbolTable

    codec = codec_description(settings, seed)
    old_manifest = _read_json(join(out, MANIFEST_NAME))
    old_codec = (old_manifest or {}).get("codec")
    if old_manifest and _codec_config(old_codec) != codec:
        raise PrepareError(
            f"{join(out, MANIFEST_NAME)} was prepared with codec {old_codec} but this run asks for "
            f"{codec}; codes from different codecs cannot be mixed: use another output folder"
        )

    utts = assign_splits(utts, valid_fraction, seed)
    languages = sorted({u.language for u in utts})
    log.info("preparing %d utterances in %s -> %s", len(utts), ", ".join(languages), out)

    # Pass 1: phonemes, then the shared symbol table (append-only).
    for tmp in list_names(out, f"{PHONEME_CACHE}{TMP_MARK}*"):  # a cache write a kill cut short
        remove(join(out, tmp))
    phones, phonemized = phonemize_all(utts, progress, cache=join(out, PHONEME_CACHE))
    log.info(
        "phonemes: %d utterance(s) phonemized, %d from earlier runs",
        phonemized["phonemized"],
        phonemized["cached"],
    )
    skips = {lang: SkipCounter() for lang in languages}
    ready = []
    for u in utts:
        if not u.text.strip():
            skips[u.language].add("empty_text", u.id)
        elif not phones[u.id]:
            skips[u.language].add("unphonemizable_text", u.id)
        else:
            ready.append(u)
    table = SymbolTable.load_or_new(join(out, SYMBOLS_NAME))
    # Grown in memory only: symbols.json and manifest.json are committed together at the end.
    added = table.extend(s for u in ready for s in phones[u.id])

    # A codec fitted to the corpus is fitted once, before any shard, and reused by every later run here.
    if codec.get("kind") == "mel_rvq":
        codec = fitted_codec(out, codec, ready, settings, seed, old_codec, progress)
    if codec.get("kind") == "mel_rvq" or not codec.get("pretrained", True):
        log.warning("%s", codec_summary(codec))

    # Pass 2: shard jobs; shards already written by an identical job are skipped.
    jobs, reused = [], []
    by_lang: dict[str, list[Utterance]] = defaultdict(list)
    for u in ready:
        by_lang[u.language].append(u)
    for lang in languages:
        rows = sorted(by_lang[lang], key=lambda u: u.id)
        n_shards = max(1, math.ceil(len(rows) / settings.rows_per_shard))
        lang_dir = join(out, lang)
        # Half-written shards of a killed run: never read, never taken as finished; removed here.
        for name in list_names(lang_dir, f".part-*{TMP_MARK}*"):
            log.info("removing %s, left by an interrupted run", join(lang_dir, name))
            remove(join(lang_dir, name))
        for index in range(n_shards):
            chunk = rows[index * settings.rows_per_shard : (index + 1) * settings.rows_per_shard]
            payload = [{**u.to_dict(), "phonemes": table.encode(phones[u.id])} for u in chunk]
            spec = {
                "rows": payload,
                "codec": codec,
                "min": settings.min_duration,
                "max": settings.max_duration,
                "format": SHARD_FORMAT_VERSION,
            }
            fp = _fingerprint(spec)
            path = join(lang_dir, shard_name(index))
            if is_file(path) and read_shard_stats(path)[0] == fp:
                reused.append(path)
                continue
            jobs.append(
                {
                    "language": lang,
                    "index": index,
                    "path": path,
                    "rows": payload,
                    "fingerprint": fp,
                    "symbols_version": table.version,
                }
            )
        # Shards beyond this run's count are leftovers of an earlier, larger layout.
        for stale in list_names(lang_dir, "part-*.parquet")[n_shards:]:
            log.info("removing stale shard %s", join(lang_dir, stale))
            remove(join(lang_dir, stale))

    if reused:
        log.info("%d shard(s) already prepared, skipped", len(reused))
    if jobs:
        _run_jobs(jobs, codec, out, settings, progress)

    manifest = _build_manifest(out, languages, skips, codec, table, old_manifest)
    # What this run did (a re-run of finished work shows zeros).
    manifest["last_run"] = {**phonemized, "shards_written": len(jobs), "shards_reused": len(reused)}
    _commit(out, table, manifest, added)
    return manifest


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
    ready: list[Utterance],
    settings: PrepareSection,
    seed: int,
    old_codec: dict | None,
    progress: bool,
) -> dict:
    """The mel_rvq codec dict with its ``fitted`` file and ``sha256``: the tables already in ``out``
    (written by an earlier run into this folder: they made its shards, so they are kept), else fitted
    now on a seeded sample of the training split and written atomically beside the shards."""
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

    sample = _fit_sample(ready, spec.fit_utterances, seed)
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


def _run_jobs(jobs: list[dict], codec: dict, out: str, settings: PrepareSection, progress: bool) -> None:
    import ray

    # Big jobs first so the pool's tail is short.
    jobs = sorted(jobs, key=lambda j: -len(j["rows"]))
    use_gpu = _gpus_available()
    ds = ray.data.from_items(
        [{"job": json.dumps(j, ensure_ascii=False)} for j in jobs], override_num_blocks=len(jobs)
    )
    # Settings travel as class attributes of a per-run subclass, so the actor needs no constructor
    # arguments. (Ray Data still stores the class itself in the object store, and Ray's core worker
    # prints one "constructor arguments in the object store" line per run; harmless.)
    encoder = type(
        "ShardEncoder",
        (ShardEncoder,),
        {
            "settings": {
                "codec": codec,
                "prepared_dir": out,
                "min_duration": settings.min_duration,
                "max_duration": settings.max_duration,
                "codec_batch_size": settings.codec_batch_size,
            }
        },
    )
    n_actors = min(settings.codec_actors, len(jobs))
    ds = ds.map_batches(
        encoder,
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=n_actors),
        num_gpus=1 if use_gpu else 0,
        num_cpus=1,
    )
    total = sum(len(j["rows"]) for j in jobs)
    # The bar counts input utterances (kept or skipped), so its utt/s is the rate work gets done; the
    # postfix gives the audio kept per wall-clock second, from the start of the pool (actor start-up
    # included), in hours/s and as a multiple of real time.
    bar = _bar(total, "encode", "utt", progress)
    t0 = time.perf_counter()
    seconds = 0.0
    kept = 0
    for row in ds.iter_rows():
        stats = json.loads(row["stats"])
        seconds += stats["seconds"]
        kept += stats["rows"]
        bar.update(stats["input_rows"])
        bar.set_postfix_str(progress_postfix(seconds, kept, time.perf_counter() - t0))
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


def progress_postfix(audio_seconds: float, kept: int, elapsed: float) -> str:
    """The encode bar's postfix: kept utterances/s, audio-hours/s (and x real time), hours done."""
    elapsed = max(elapsed, 1e-9)
    return (
        f"{kept / elapsed:.1f} kept utt/s, {audio_seconds / 3600 / elapsed:.4f} audio-h/s "
        f"({audio_seconds / elapsed:.1f}x real time), {audio_seconds / 3600:.3f} h done"
    )


def _build_manifest(out: str, languages, skips, codec, table, old_manifest: dict | None) -> dict:
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
            job, stats = read_shard_stats(join(out, rel))
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
