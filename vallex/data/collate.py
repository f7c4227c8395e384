"""Ray Data numpy batch -> padded model tensors (on the training hot path, so vectorized).

``iter_batches(batch_format="numpy")`` gives variable-length list columns (``phonemes``, ``codes``) as
1-D object arrays whose items are numpy arrays (int32 / int16). Padding is done without a Python loop
over the batch: concatenate every row once, then scatter into the padded buffer with a length mask
(row-major mask order is exactly the concatenation order).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

PAD_ID = 0  # "<pad>" is symbol 0 in symbols.json; codes are padded with 0 too and masked by code_lens


def _as_rows(column) -> list[np.ndarray]:
    if isinstance(column, np.ndarray) and column.dtype != object and column.ndim == 2:
        return list(column)  # Ray gives a 2-D array when every row happens to have the same length
    return [np.asarray(row) for row in column]


def _lengths(rows: list[np.ndarray]) -> np.ndarray:
    return np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))


def row_lengths(column) -> np.ndarray:
    """Length of every row of a variable-length list column (as Ray gives it), int64."""
    if isinstance(column, np.ndarray) and column.dtype != object and column.ndim == 2:
        return np.full(column.shape[0], column.shape[1], dtype=np.int64)
    return _lengths(_as_rows(column))


def pad_rows(rows: list[np.ndarray], lengths: np.ndarray, width: int) -> np.ndarray:
    """``[B, width]`` int64, row ``i`` = ``rows[i]`` then PAD_ID."""
    out = np.full((len(rows), width), PAD_ID, dtype=np.int64)
    if len(rows):
        out[np.arange(width) < lengths[:, None]] = np.concatenate(rows)
    return out


def collate(
    batch: Mapping[str, np.ndarray], language_ids: Mapping[str, int], num_codebooks: int
) -> dict[str, torch.Tensor]:
    """Model inputs for one batch of shard rows.

    Returns ``phonemes`` Long[B,S] and ``codes`` Long[B,T,Q] (PAD_ID-padded), ``phoneme_lens`` and
    ``code_lens`` Long[B], and ``language`` Long[B] (ids from ``language_ids``).
    """
    for key in ("phonemes", "codes", "frames", "language"):
        if key not in batch:
            raise KeyError(
                f"batch has no {key!r} column (has {sorted(batch)}); keep it in the dataset's columns"
            )
    languages = np.asarray(batch["language"]).astype(str)
    uniq, inverse = np.unique(languages, return_inverse=True)
    unknown = [lang for lang in uniq.tolist() if lang not in language_ids]
    if unknown:
        raise ValueError(
            f"batch holds language(s) {unknown} with no language id; known: {dict(language_ids)}. "
            "The model's language table must cover every trained language"
        )
    language = np.asarray([language_ids[lang] for lang in uniq.tolist()], dtype=np.int64)[inverse.reshape(-1)]

    phonemes = _as_rows(batch["phonemes"])
    phoneme_lens = _lengths(phonemes)
    codes = _as_rows(batch["codes"])
    code_sizes = _lengths(codes)
    frames = np.asarray(batch["frames"], dtype=np.int64)
    bad = np.flatnonzero(code_sizes != frames * num_codebooks)
    if len(bad):
        i = int(bad[0])
        who = batch["utt_id"][i] if "utt_id" in batch else f"row {i}"
        raise ValueError(
            f"{who}: codes hold {code_sizes[i]} values but frames={frames[i]} x num_codebooks={num_codebooks} "
            f"= {frames[i] * num_codebooks} were expected (is num_codebooks the corpus's?)"
        )

    B = len(phonemes)
    S = int(phoneme_lens.max(initial=0))
    T = int(frames.max(initial=0))
    # Codes are flat codebook-major (schema.codes_matrix): row b is [Q, frames_b] flattened, so a
    # [B, Q, T] buffer masked by t < frames_b receives the concatenation in order. Then -> [B, T, Q].
    codes_bqt = np.zeros((B, num_codebooks, T), dtype=np.int64)
    if B:
        mask = np.broadcast_to(np.arange(T) < frames[:, None, None], codes_bqt.shape)
        codes_bqt[mask] = np.concatenate(codes)
    return {
        "phonemes": torch.from_numpy(pad_rows(phonemes, phoneme_lens, S)),
        "phoneme_lens": torch.from_numpy(phoneme_lens),
        "codes": torch.from_numpy(codes_bqt.transpose(0, 2, 1).copy()),
        "code_lens": torch.from_numpy(frames.copy()),
        "language": torch.from_numpy(language),
    }
