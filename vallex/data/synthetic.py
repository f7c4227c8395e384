"""A synthetic prepared corpus: valid shards full of random codes, for tests and benchmarks.

Everything downstream of data preparation (corpus checks, weights, mixing, collate, training loops)
only needs the on-disk contract of ``vallex.data.schema``, not real audio. This writes that contract
in milliseconds. It is not a substitute for ``ray_jobs/prepare.py``: the phonemes and codes mean
nothing, so a model trained on them learns nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vallex.data.schema import MANIFEST_NAME, SHARD_FORMAT_VERSION, SHARD_SCHEMA, SYMBOLS_NAME, shard_name

SPECIAL_SYMBOLS = ("<pad>", "<bos>", "<eos>", "<unk>")
SYNTHETIC_SYMBOLS_VERSION = 1
FRAME_RATE = 75  # EnCodec 24 kHz: 75 code frames per second
CODEBOOK_SIZE = 1024
SPEAKERS_PER_LANGUAGE = 4


def symbols_fingerprint(symbols: list[str]) -> str:
    """sha256 of the symbol list, so a reader can tell two tables with the same version apart."""
    return "sha256:" + hashlib.sha256(json.dumps(symbols).encode()).hexdigest()


def _language_table(
    lang: str, n_train: int, n_valid: int, rng, frames, phonemes, num_codebooks, num_symbols, code_values
):
    n = n_train + n_valid
    # Splits interleaved (as real preparation does) so readers must filter on the column.
    split = np.array(["train"] * n_train + ["valid"] * n_valid, dtype=object)
    rng.shuffle(split)
    n_frames = rng.integers(frames[0], frames[1] + 1, size=n)
    n_phones = rng.integers(phonemes[0], phonemes[1] + 1, size=n)
    # Phoneme ids avoid the special symbols: a real table never emits <pad>/<bos>/<eos> as text.
    first = len(SPECIAL_SYMBOLS)
    phone_rows = [rng.integers(first, num_symbols, size=k, dtype=np.int32) for k in n_phones]
    code_rows = [rng.integers(0, code_values, size=num_codebooks * t, dtype=np.int16) for t in n_frames]
    return pa.table(
        {
            "utt_id": [f"{lang}-{i:06d}" for i in range(n)],
            "speaker": [f"{lang}-spk{i % SPEAKERS_PER_LANGUAGE}" for i in range(n)],
            "language": [lang] * n,
            "text": [f"synthetic {lang} utterance {i}" for i in range(n)],
            "phonemes": pa.array(phone_rows, type=pa.list_(pa.int32())),
            "codes": pa.array(code_rows, type=pa.list_(pa.int16())),
            "frames": pa.array(n_frames, type=pa.int32()),
            "num_codebooks": pa.array(np.full(n, num_codebooks), type=pa.int8()),
            "duration": pa.array(n_frames / FRAME_RATE, type=pa.float32()),
            "split": pa.array(split.tolist(), type=pa.string()),
        },
        schema=SHARD_SCHEMA,
    )


def write_synthetic_corpus(
    out_dir: str | os.PathLike,
    sizes: dict[str, int],
    *,
    valid_per_language: int = 4,
    seed: int = 0,
    frames: tuple[int, int] = (20, 60),
    phonemes: tuple[int, int] = (5, 20),
    num_codebooks: int = 8,
    num_symbols: int = 40,
    rows_per_shard: int = 500,
    code_values: int | Mapping[str, int] = CODEBOOK_SIZE,
) -> Path:
    """Write a prepared corpus with ``sizes[lang]`` train rows per language; return its directory.

    ``frames``/``phonemes`` are inclusive (min, max) lengths per utterance. A language with more than
    ``rows_per_shard`` rows gets several shards, as real preparation writes them.

    ``code_values`` (one for all, or per language; default all 1024) sets how hard a language is:
    its codes are drawn uniformly from the first ``code_values`` values of each codebook, so the best
    loss a model can reach per code is log(code_values) and the amount to learn grows with it (1 = a
    constant code, learnt at once). The default draws exactly what earlier versions drew.
    """
    if num_symbols <= len(SPECIAL_SYMBOLS):
        raise ValueError(f"num_symbols={num_symbols} leaves no phoneme ids after {list(SPECIAL_SYMBOLS)}")
    for lang, n in sizes.items():
        if n < 0:
            raise ValueError(f"sizes[{lang!r}] = {n}: a language needs >= 0 train rows")
    values = dict(code_values) if isinstance(code_values, Mapping) else dict.fromkeys(sizes, code_values)
    for lang in sizes:
        k = values.get(lang, CODEBOOK_SIZE)
        if not (isinstance(k, int) and 1 <= k <= CODEBOOK_SIZE):
            raise ValueError(f"code_values[{lang!r}] = {k!r}: must be an integer in [1, {CODEBOOK_SIZE}]")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    symbols = list(SPECIAL_SYMBOLS) + [f"p{i}" for i in range(num_symbols - len(SPECIAL_SYMBOLS))]
    (out / SYMBOLS_NAME).write_text(json.dumps({"version": SYNTHETIC_SYMBOLS_VERSION, "symbols": symbols}))

    languages = {}
    for i, (lang, n_train) in enumerate(sorted(sizes.items())):
        # One generator per language (seeded by its position) so adding a language leaves others unchanged.
        rng = np.random.default_rng([seed, i])
        table = _language_table(
            lang,
            n_train,
            valid_per_language,
            rng,
            frames,
            phonemes,
            num_codebooks,
            num_symbols,
            values.get(lang, CODEBOOK_SIZE),
        )
        (out / lang).mkdir(exist_ok=True)
        shards = []
        for k, start in enumerate(range(0, max(table.num_rows, 1), rows_per_shard)):
            rel = f"{lang}/{shard_name(k)}"
            pq.write_table(table.slice(start, rows_per_shard), out / rel)
            shards.append(rel)
        frames_total = int(pc.sum(table["frames"]).as_py() or 0)
        languages[lang] = {
            "shards": shards,
            "utterances": {"train": n_train, "valid": valid_per_language},
            "hours": round(frames_total / FRAME_RATE / 3600, 6),
            "frames": frames_total,
            "phonemes": int(pc.sum(pc.list_value_length(table["phonemes"])).as_py() or 0),
            "speakers": min(SPEAKERS_PER_LANGUAGE, table.num_rows),
            "skipped": {},
        }

    manifest = {
        "format": SHARD_FORMAT_VERSION,
        "symbols_version": SYNTHETIC_SYMBOLS_VERSION,
        "symbols_fingerprint": symbols_fingerprint(symbols),
        "codec": {
            "name": "encodec_24khz",  # the shape of EnCodec output; the values are random
            "bandwidth": 6.0,
            "sample_rate": 24000,
            "frame_rate": FRAME_RATE,
            "num_codebooks": num_codebooks,
            "codebook_size": CODEBOOK_SIZE,
            "pretrained": False,
        },
        "languages": languages,
        "synthetic": True,  # written by vallex.data.synthetic, not by prepare.py
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    return out


def write_phonetic_corpus(
    out_dir: str | os.PathLike,
    sizes: dict[str, int],
    *,
    valid_per_language: int = 8,
    seed: int = 0,
    phonemes: tuple[int, int] = (5, 20),
    frames_per_phoneme: tuple[int, int] = (2, 5),
    num_codebooks: int = 8,
    num_symbols: int = 40,
    rows_per_shard: int = 500,
) -> Path:
    """Like :func:`write_synthetic_corpus`, but the codes say the phonemes: each phoneme id has one
    fixed code per codebook (the same in every language and utterance), held for a random 2-5 frames
    (``frames_per_phoneme``), so a model can learn to read codes (a recognizer) or to speak its text.

    The table also holds a word boundary ``_``, put between words of 2-6 phones and given no frames,
    as real preparation writes one between words that sound joined.
    """
    from vallex.text.phonemize import WORD_BOUNDARY

    if num_symbols <= len(SPECIAL_SYMBOLS) + 1:
        raise ValueError(f"num_symbols={num_symbols} leaves no phoneme ids after the specials and '_'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    phones = [f"p{i}" for i in range(num_symbols - len(SPECIAL_SYMBOLS) - 1)]
    symbols = [*SPECIAL_SYMBOLS, WORD_BOUNDARY, *phones]
    boundary = len(SPECIAL_SYMBOLS)
    first = boundary + 1
    # The code of phoneme p in codebook q: fixed by the seed alone, shared by every language.
    sound = np.random.default_rng([seed, 10**6]).integers(0, CODEBOOK_SIZE, size=(num_symbols, num_codebooks))
    (out / SYMBOLS_NAME).write_text(json.dumps({"version": SYNTHETIC_SYMBOLS_VERSION, "symbols": symbols}))

    languages = {}
    for i, (lang, n_train) in enumerate(sorted(sizes.items())):
        rng = np.random.default_rng([seed, i])
        n = n_train + valid_per_language
        split = np.array(["train"] * n_train + ["valid"] * valid_per_language, dtype=object)
        rng.shuffle(split)
        phone_rows, code_rows, n_frames = [], [], []
        for _ in range(n):
            ids = rng.integers(first, num_symbols, size=int(rng.integers(phonemes[0], phonemes[1] + 1)))
            holds = rng.integers(frames_per_phoneme[0], frames_per_phoneme[1] + 1, size=len(ids))
            row, word = [], int(rng.integers(2, 7))
            for k, p in enumerate(ids):
                if k == word:
                    row.append(boundary)
                    word += int(rng.integers(2, 7))
                row.append(int(p))
            phone_rows.append(np.array(row, dtype=np.int32))
            codes = np.repeat(sound[ids], holds, axis=0).T  # [Q, frames]
            code_rows.append(np.ascontiguousarray(codes, dtype=np.int16).reshape(-1))
            n_frames.append(codes.shape[1])
        n_frames = np.array(n_frames)
        table = pa.table(
            {
                "utt_id": [f"{lang}-{k:06d}" for k in range(n)],
                "speaker": [f"{lang}-spk{k % SPEAKERS_PER_LANGUAGE}" for k in range(n)],
                "language": [lang] * n,
                "text": [f"phonetic {lang} utterance {k}" for k in range(n)],
                "phonemes": pa.array(phone_rows, type=pa.list_(pa.int32())),
                "codes": pa.array(code_rows, type=pa.list_(pa.int16())),
                "frames": pa.array(n_frames, type=pa.int32()),
                "num_codebooks": pa.array(np.full(n, num_codebooks), type=pa.int8()),
                "duration": pa.array(n_frames / FRAME_RATE, type=pa.float32()),
                "split": pa.array(split.tolist(), type=pa.string()),
            },
            schema=SHARD_SCHEMA,
        )
        (out / lang).mkdir(exist_ok=True)
        shards = []
        for k, start in enumerate(range(0, max(table.num_rows, 1), rows_per_shard)):
            rel = f"{lang}/{shard_name(k)}"
            pq.write_table(table.slice(start, rows_per_shard), out / rel)
            shards.append(rel)
        languages[lang] = {
            "shards": shards,
            "utterances": {"train": n_train, "valid": valid_per_language},
            "hours": round(int(n_frames.sum()) / FRAME_RATE / 3600, 6),
            "frames": int(n_frames.sum()),
            "phonemes": int(sum(len(r) for r in phone_rows)),
            "speakers": min(SPEAKERS_PER_LANGUAGE, n),
            "skipped": {},
        }
    manifest = {
        "format": SHARD_FORMAT_VERSION,
        "symbols_version": SYNTHETIC_SYMBOLS_VERSION,
        "symbols_fingerprint": symbols_fingerprint(symbols),
        "codec": {
            "name": "synthetic_phonetic",  # codes made from the phonemes, not from audio
            "sample_rate": 24000,
            "frame_rate": FRAME_RATE,
            "num_codebooks": num_codebooks,
            "codebook_size": CODEBOOK_SIZE,
        },
        "languages": languages,
        "synthetic": True,
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    return out
