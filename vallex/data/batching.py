"""How each training worker cuts its share of the mixed stream into batches.

Two modes, chosen by ``data.max_tokens``:

fixed (``max_tokens = 0``)
    ``train.batch_size`` rows per batch in stream order (through the local shuffle buffer). Rows of
    different lengths share a batch, so much of it is padding.

token budget (``max_tokens > 0``, like lhotse's max-duration)
    A row costs ``phonemes + frames`` positions: the AR and the NAR both run one transformer over
    ``[phonemes ; frames]``, padded to the longest phoneme sequence plus the longest frame count of
    the batch, so a batch's memory is ``rows x (max phonemes + max frames)`` positions (the AR's extra
    EOS position is left out). That padded cost is what the budget caps, and at most
    ``train.batch_size`` rows go in one batch. Each worker reads ``data.bucket_rows`` rows at a time
    (a *bucket pool*), sorts them by frames (then phonemes, then a seeded random key, so equal lengths
    from different languages interleave), cuts the sorted rows greedily into batches that fit the
    budget, and emits the pool's batches in a random order drawn from ``(seed, rank, pool index)``.
    Batches still mix languages wherever the languages' lengths overlap: sorting groups rows by length,
    not by language (tests/data/test_batching.py measures it on a corpus whose languages differ in length).

    A row whose own cost exceeds the budget stops the run with an error naming its ``utt_id`` and
    ``data.max_tokens``: emitting it alone would break the memory promise the budget exists for.

Resume: the loop skips ``consumed_batches`` batches of a fresh stream. The batch sequence is a
function of the rank's row stream, the seed and the settings only (pool boundaries fall every
``bucket_rows`` rows of the stream), so skipping ``n`` batches skips the same number of batches the
run trained on — the very same batches when the rank's row stream is the same, i.e. the run resumes
with unchanged data and train settings and worker count (see ``vallex.data.mixing`` for the stream's
own guarantee).

Loss weighting with the token budget: the model's loss is a token mean over each micro-batch (AR mean
plus NAR mean), DeepSpeed divides each micro-batch's loss by ``train.grad_accum`` and averages the
gradients over ranks, so every micro-batch weighs the same whatever its row count. Under a budget the
batches hold about the same number of real tokens (``max_tokens x (1 - padding)``), so this is close
to a mean over all tokens of the step; fixed-size batches weigh a batch of short utterances (fewer
tokens) as much as one of long ones.

Run length: steps are counted, not batches per epoch, so every rank runs ``max_steps x grad_accum``
micro-batches. A rank must never run out of stream first: a rank that starts a new pass over its
``streaming_split`` waits for the others to do so too, while they wait for it in a gradient
all-reduce. A token batch holds at most ``train.batch_size`` rows, so the trainer's row budget
(``max_steps x grad_accum x batch_size x workers``) still bounds what any rank consumes;
:func:`stream_rows` adds one bucket pool per worker of read-ahead. If a token-budget stream still ran
out, :func:`train_batches` raises instead of starting another pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping

import numpy as np

from vallex.data.collate import row_lengths

MAX_TOKENS_KEY = "data.max_tokens"


def batch_lengths(batch: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Phonemes and frames per row of a numpy batch, int64 each."""
    return row_lengths(batch["phonemes"]), np.asarray(batch["frames"], dtype=np.int64)


def padding_cost(phonemes: np.ndarray, frames: np.ndarray) -> tuple[int, int]:
    """(real, padded) positions of one collated batch: ``sum(phonemes + frames)`` and
    ``rows x (max phonemes + max frames)``."""
    if len(frames) == 0:
        return 0, 0
    return int(phonemes.sum() + frames.sum()), len(frames) * int(phonemes.max() + frames.max())


def check_fits(
    batch: Mapping[str, np.ndarray], phonemes: np.ndarray, frames: np.ndarray, max_tokens: int
) -> None:
    """Raise if a row alone costs more than ``max_tokens`` positions, naming the first such row."""
    cost = phonemes + frames
    over = np.flatnonzero(cost > max_tokens)
    if len(over):
        i = int(over[0])
        who = batch["utt_id"][i] if "utt_id" in batch else f"row {i}"
        raise ValueError(
            f"{who}: {int(frames[i])} frames + {int(phonemes[i])} phonemes = {int(cost[i])} positions, more "
            f"than {MAX_TOKENS_KEY}={max_tokens} allows in a whole batch; raise {MAX_TOKENS_KEY} to at least "
            f"{int(cost[i])}, or leave such utterances out when preparing (prepare.max_duration)"
        )


def cut_by_budget(
    phonemes: np.ndarray, frames: np.ndarray, order: np.ndarray, max_tokens: int, max_rows: int
) -> list[np.ndarray]:
    """Greedy cut of the rows in ``order`` into consecutive batches of at most ``max_rows`` rows whose
    padded cost ``rows x (max phonemes + max frames)`` is at most ``max_tokens`` (every row must fit
    alone: see :func:`check_fits`)."""
    out: list[np.ndarray] = []
    current: list[int] = []
    s_max = t_max = 0
    for i, s, t in zip(order.tolist(), phonemes[order].tolist(), frames[order].tolist(), strict=True):
        s_new, t_new = max(s_max, s), max(t_max, t)
        if current and (len(current) >= max_rows or (len(current) + 1) * (s_new + t_new) > max_tokens):
            out.append(np.asarray(current, dtype=np.int64))
            current, s_new, t_new = [], s, t
        current.append(i)
        s_max, t_max = s_new, t_new
    if current:
        out.append(np.asarray(current, dtype=np.int64))
    return out


def length_order(phonemes: np.ndarray, frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Row indices sorted by frames, then phonemes, then a random key (ties in a random order)."""
    return np.lexsort((rng.random(len(frames)), phonemes, frames))


def take_rows(batch: Mapping[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    return {k: np.asarray(v)[idx] for k, v in batch.items()}


def bucket_batches(
    pool: Mapping[str, np.ndarray], max_tokens: int, max_rows: int, rng: np.random.Generator
) -> list[dict[str, np.ndarray]]:
    """One pool of rows as budgeted batches of similar lengths, in a random order drawn from ``rng``."""
    phonemes, frames = batch_lengths(pool)
    check_fits(pool, phonemes, frames, max_tokens)
    cuts = cut_by_budget(phonemes, frames, length_order(phonemes, frames, rng), max_tokens, max_rows)
    return [take_rows(pool, cuts[j]) for j in rng.permutation(len(cuts))]


def token_batches(
    pools: Iterable[Mapping[str, np.ndarray]], max_tokens: int, max_rows: int, *, seed: int = 0, rank: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """Every pool of rows (numpy batches of ``data.bucket_rows`` rows) as budgeted batches; pool ``k``'s
    order is drawn from ``(seed, rank, k)``, so the sequence depends only on the pools and these."""
    for k, pool in enumerate(pools):
        yield from bucket_batches(pool, max_tokens, max_rows, np.random.default_rng([seed, rank, k]))


def validation_indices(rows: Mapping[str, np.ndarray], batch_size: int, max_tokens: int) -> list[np.ndarray]:
    """Row indices of each validation batch of ``rows``: consecutive chunks of ``batch_size`` rows, or with
    a token budget the rows sorted by length and cut like training batches (no randomness). Checked
    against the budget too, so a row that cannot fit fails the run before its first step."""
    phonemes, frames = batch_lengths(rows)
    n = len(frames)
    if not max_tokens:
        return [np.arange(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    check_fits(rows, phonemes, frames, max_tokens)
    order = np.lexsort((np.arange(n), phonemes, frames))
    return cut_by_budget(phonemes, frames, order, max_tokens, batch_size)


def stream_rows(
    budget_rows: int, batch_size: int, num_workers: int, max_tokens: int, bucket_rows: int
) -> int:
    """Rows the mixed stream needs for a run whose ranks may consume ``budget_rows`` rows in all
    (``max_steps x grad_accum x batch_size x workers``): 10% and two batches per worker of slack for
    uneven splits and ``drop_last``, plus, with a token budget, one bucket pool per worker read ahead
    (a token batch holds at most ``batch_size`` rows, so ``budget_rows`` still bounds the batches)."""
    rows = math.ceil(budget_rows * 1.1) + batch_size * num_workers * 2
    return rows + (bucket_rows * num_workers if max_tokens else 0)


def train_batches(
    shard,
    *,
    batch_size: int,
    max_tokens: int = 0,
    bucket_rows: int = 1024,
    shuffle_buffer: int = 0,
    seed: int = 0,
    rank: int = 0,
    skip: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """This rank's training batches from ``shard`` (a Ray ``DataIterator`` or ``Dataset``), numpy format.

    The first ``skip`` batches are produced and dropped (resume: Ray Data keeps no stream position).
    Fixed-size batches start another pass over the shard when it ends, as all ranks do together;
    token-budget batches raise instead (see the module docstring).
    """
    shuffle = {
        "local_shuffle_buffer_size": shuffle_buffer or None,
        "local_shuffle_seed": seed + rank if shuffle_buffer else None,
    }
    if not max_tokens:
        while True:
            got = 0
            for b in shard.iter_batches(
                batch_size=batch_size, batch_format="numpy", drop_last=True, **shuffle
            ):
                got += 1
                if skip:
                    skip -= 1
                    continue
                yield b
            if got == 0:
                raise RuntimeError(f"rank {rank}: the training stream yielded no full batch of {batch_size}")
    emitted = 0
    pools = shard.iter_batches(batch_size=bucket_rows, batch_format="numpy", drop_last=True, **shuffle)
    for b in token_batches(pools, max_tokens, batch_size, seed=seed, rank=rank):
        emitted += 1
        if skip:
            skip -= 1
            continue
        yield b
    raise RuntimeError(
        f"rank {rank}: the training stream ran out after {emitted} token-budget batches. Every rank must "
        "run train.max_steps x train.grad_accum batches of at most train.batch_size rows, and the stream "
        "is sized for that (batching.stream_rows); starting another pass could hang the other ranks, so "
        "the run stops. Was the dataset built without stream_rows?"
    )


class PaddingStats:
    """Real and padded positions of the batches trained on since the last :meth:`reset`."""

    def __init__(self) -> None:
        self.real = 0
        self.padded = 0

    def update(self, batch: Mapping[str, np.ndarray]) -> None:
        real, padded = padding_cost(*batch_lengths(batch))
        self.real += real
        self.padded += padded

    def reset(self) -> None:
        self.real = self.padded = 0

    @property
    def fraction(self) -> float | None:
        """Share of the padded positions that are padding; None before any batch."""
        return 1 - self.real / self.padded if self.padded else None
