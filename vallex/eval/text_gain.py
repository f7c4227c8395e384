"""Text gain: how much a model reads its text, in nats per frame.

For every validation utterance ``i`` of a language, the loss of its own codes given its own phonemes
is compared with the loss of the *same codes* given the phonemes of utterance ``perm[i]`` of the same
language, ``perm`` a fixed derangement (no utterance keeps its text)::

    text_gain = loss(codes_i | phonemes_perm[i]) - loss(codes_i | phonemes_i)      (mean over frames)

Only the phoneme sequence is swapped: targets, frame counts, language and (NAR) the prompt prefix and
the codebook scored stay the utterance's own, so both losses count the same tokens and their
difference is per frame. A model that ignores its text scores 0 (within float noise); one that reads
it pays for the wrong text. The NAR stage and prefix that eval mode draws from a hash of the sample's
content (text included) are pinned to the true sample's, so the NAR figure compares like with like.

The derangement is Sattolo's algorithm (a uniformly random single cycle, so no fixed point) over the
language's validation rows in table order, seeded by ``(seed, crc32(language))``: the same on every
rank, at every evaluation and in every run over the same validation split.
"""

from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa
import torch

from vallex.data.batching import validation_indices
from vallex.data.collate import collate
from vallex.data.corpus import rank_block


def derangement(n: int, seed: int, key: str = "") -> np.ndarray:
    """A permutation of ``range(n)`` with no fixed point (one n-cycle), fixed by ``(seed, key)``."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {n}")
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    perm = np.arange(n)
    for i in range(n - 1, 0, -1):  # Sattolo: swap with a strictly earlier position
        j = int(rng.integers(0, i))
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def mismatched_table(table: pa.Table, seed: int, lang: str) -> pa.Table:
    """``table`` with each row's phonemes replaced by those of another row (a fixed derangement)."""
    perm = derangement(table.num_rows, seed, lang)
    i = table.schema.get_field_index("phonemes")
    return table.set_column(i, "phonemes", table.column("phonemes").take(pa.array(perm)))


def mismatched_batches(
    model,
    tables: dict[str, pa.Table],
    language_ids: dict[str, int],
    num_codebooks: int,
    batch_size: int,
    rank: int,
    world: int,
    seed: int,
    max_tokens: int = 0,
) -> tuple[dict[str, list[dict[str, torch.Tensor]]], list[str]]:
    """This rank's block (:func:`vallex.data.corpus.rank_block`, as the validation losses use) of each
    language's validation rows, collated with mismatched phonemes and the true rows' NAR stage and prefix pinned.

    Returns ``(batches per language, languages skipped)``: a language with fewer than 2 validation rows
    has no derangement and no text gain. Batches are grouped as the true rows would be, under
    ``max_tokens`` by the longer of each row's two phoneme sequences, so both fit the budget.
    ``model`` is the bare VallexModel (only its config and hash draw are used: no forward).
    """
    out: dict[str, list[dict[str, torch.Tensor]]] = {}
    skipped = []
    for lang, table in tables.items():
        if table.num_rows < 2:
            skipped.append(lang)
            continue
        swapped = mismatched_table(table, seed, lang)
        take = rank_block(table.num_rows, rank, world)
        true_rows = _rows(table.take(take))
        mis_rows = _rows(swapped.take(take))
        longer = dict(true_rows)
        longer["phonemes"] = np.empty(len(take), dtype=object)  # 1-D even when lengths are equal
        for k, (a, b) in enumerate(zip(true_rows["phonemes"], mis_rows["phonemes"], strict=True)):
            longer["phonemes"][k] = a if len(a) >= len(b) else b
        batches = []
        for idx in validation_indices(longer, batch_size, max_tokens):
            true_batch = collate({c: v[idx] for c, v in true_rows.items()}, language_ids, num_codebooks)
            batch = collate({c: v[idx] for c, v in mis_rows.items()}, language_ids, num_codebooks)
            batch["nar_stage"], batch["nar_prefix_lens"] = model.validation_nar_draw(true_batch)
            batches.append(batch)
        out[lang] = batches
    return out, skipped


def _rows(table: pa.Table) -> dict[str, np.ndarray]:
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}


def text_gains(true: dict[str, dict], mismatched: dict[str, dict]) -> dict[str, dict[str, float | None]]:
    """Per language ``ar_text_gain``, ``nar_text_gain`` (mismatched loss - true loss, nats/frame; None
    for a stage not run or a language without mismatched rows) and ``text_gain`` (the AR's, else the
    NAR's: the AR decides what is said, the NAR mostly how it sounds)."""
    out = {}
    for lang, v in true.items():
        m = mismatched.get(lang, {})
        gains = {}
        for stage in ("ar", "nar"):
            a, b = v.get(f"{stage}_loss"), m.get(f"{stage}_loss")
            if a is not None and b is not None and m[f"{stage}_tokens"] != v[f"{stage}_tokens"]:
                raise RuntimeError(  # both passes must score the same tokens, or the gain is not per frame
                    f"{lang}: the mismatched-text pass scored {m[f'{stage}_tokens']} {stage} tokens, the "
                    f"true pass {v[f'{stage}_tokens']}: they are not the same utterances"
                )
            gains[f"{stage}_text_gain"] = None if a is None or b is None else b - a
        gains["text_gain"] = (
            gains["ar_text_gain"] if gains["ar_text_gain"] is not None else gains["nar_text_gain"]
        )
        out[lang] = gains
    return out
