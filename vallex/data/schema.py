"""The on-disk contract between data preparation and everything that reads its output.

A prepared corpus is a directory::

    <out>/manifest.json          per-language counts, skips, codec settings, symbol-table version
    <out>/symbols.json           the shared phoneme symbol table (see vallex.text.symbols)
    <out>/<lang>/part-NNNNN.parquet

Every Parquet shard has exactly ``SHARD_SCHEMA``. Codes are stored flat, codebook-major:
``codes[q * frames + t]`` is codebook ``q`` at frame ``t``; ``codes_matrix`` undoes it.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

SHARD_FORMAT_VERSION = 1

SPLITS = ("train", "valid")

SHARD_SCHEMA = pa.schema(
    [
        pa.field("utt_id", pa.string(), nullable=False),
        pa.field("speaker", pa.string(), nullable=False),
        pa.field("language", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        # ids into symbols.json; no BOS/EOS, the model adds what it needs
        pa.field("phonemes", pa.list_(pa.int32()), nullable=False),
        # num_codebooks * frames EnCodec codes, codebook-major (values < codebook size, fit int16)
        pa.field("codes", pa.list_(pa.int16()), nullable=False),
        pa.field("frames", pa.int32(), nullable=False),
        pa.field("num_codebooks", pa.int8(), nullable=False),
        pa.field("duration", pa.float32(), nullable=False),  # seconds of source audio
        pa.field("split", pa.string(), nullable=False),  # one of SPLITS
    ],
    metadata={"vallex_shard_format": str(SHARD_FORMAT_VERSION)},
)

# Rows per Parquet row group in a shard. The mixer reads row groups, not shards: a window takes a
# few rows of each language, and a smaller group wastes less at the edge of each read task (see
# docs/BENCHMARKS.md, "scale"); 64 rows of ~500 frames x 8 codebooks are ~0.5 MiB, a sound Parquet size.
# Shards written before this (one group each) are still read, a whole shard per visit.
ROW_GROUP_ROWS = 64

MANIFEST_NAME = "manifest.json"
SYMBOLS_NAME = "symbols.json"


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def codes_matrix(flat: np.ndarray, frames: int, num_codebooks: int) -> np.ndarray:
    """Flat codebook-major codes -> ``[num_codebooks, frames]`` array."""
    flat = np.asarray(flat)
    if flat.size != frames * num_codebooks:
        raise ValueError(
            f"codes hold {flat.size} values but frames={frames} x num_codebooks={num_codebooks} "
            f"= {frames * num_codebooks} were expected"
        )
    return flat.reshape(num_codebooks, frames)


def codes_flat(matrix: np.ndarray) -> np.ndarray:
    """``[num_codebooks, frames]`` codes -> flat int16, codebook-major."""
    matrix = np.asarray(matrix)
    if matrix.ndim != 2:
        raise ValueError(f"codes must be [num_codebooks, frames], got shape {matrix.shape}")
    return np.ascontiguousarray(matrix, dtype=np.int16).reshape(-1)


def check_schema(schema: pa.Schema, path: str) -> None:
    """Raise a ValueError naming ``path`` and the differing fields if ``schema`` is not SHARD_SCHEMA."""
    want = {f.name: f.type for f in SHARD_SCHEMA}
    got = {f.name: f.type for f in schema}
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    wrong = sorted(n for n in set(want) & set(got) if want[n] != got[n])
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing columns {missing}")
        if extra:
            parts.append(f"unexpected columns {extra}")
        for n in wrong:
            parts.append(f"column {n!r} is {got[n]} but must be {want[n]}")
        raise ValueError(
            f"{path}: not a vallex shard ({'; '.join(parts)}); re-run ray_jobs/prepare.py to rewrite it"
        )
