"""vallex's own code-level phoneme recognizer: a small CTC model from codec codes to phonemes.

It is what makes "does the model still say the words?" measurable offline and codec-agnostic, as TTS
papers do with an ASR model (Whisper WER): synthesized codes are transcribed and scored against the
text's phonemes (phoneme error rate, PER), beside the recognizer's PER on the ground-truth codes of the
same utterances (the floor: what the recognizer itself gets wrong).

One model for every language, over the corpus's shared symbol table. It is trained on the prepared
shards (``ray_jobs/recognizer.py``, or :func:`ensure_recognizer` as a stage after preparation) and saved
beside them as ``recognizer.pt`` with its per-language validation PER; training finds it there.

What is scored (the same definition at every evaluation, :func:`reference_phonemes`): the phones,
and Mandarin's tone letters (lexical: a wrong tone is a wrong word). Not scored: the special symbols
(``<pad>``, ``<bos>``, ``<eos>``, ``<unk>``), word boundaries ``_`` (espeak's word split, not a sound),
punctuation marks and stress marks ``ˈ`` ``ˌ`` (prosody, which a reading of the right phones may place
differently). The recognizer is trained on exactly these targets and can emit nothing else.

Model (``RecognizerNet``): the Q codebooks' embeddings summed per frame, a strided 1-D convolution
(75 Hz -> 37.5 Hz: phones last several frames, and half the frames halve the LSTM's cost), a 2-layer
bidirectional LSTM, and a linear layer over the symbol table whose ``<pad>`` slot (id 0, never a
target) is the CTC blank.

The file is ``torch.save({"state_dict": ..., "meta": <JSON text>})`` and is only ever read with
``torch.load(weights_only=True)``: tensors and strings, nothing that can run code.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from vallex.data.schema import codes_matrix
from vallex.files import is_file, join, read_bytes, read_failure, write_bytes
from vallex.text.phonemize import PUNCTUATION, STRESS_MARKS, WORD_BOUNDARY
from vallex.text.symbols import SPECIALS, symbols_fingerprint

if TYPE_CHECKING:
    from vallex.config import Config
    from vallex.data.corpus import PreparedCorpus

log = logging.getLogger("vallex.eval")

RECOGNIZER_FILE = "recognizer.pt"  # in the prepared corpus folder, beside manifest.json
FORMAT_VERSION = 1
BLANK_ID = 0  # <pad>: never a target, so its output slot serves as the CTC blank
UNSCORED_SYMBOLS = frozenset((*SPECIALS, WORD_BOUNDARY, *PUNCTUATION, *STRESS_MARKS))


class RecognizerError(ValueError):
    """A recognizer file is unreadable or was made for another corpus (names the file and what differs)."""


# ------------------------------------------------------------------------------------------------
# What is scored, and how


def scored_mask(symbols: Sequence[str]) -> np.ndarray:
    """Bool per symbol id: True for what the PER counts (phones and tones; see the module docstring)."""
    return np.array([s not in UNSCORED_SYMBOLS for s in symbols], dtype=bool)


def reference_phonemes(row_phonemes: Sequence[int], symbols: Sequence[str]) -> list[int]:
    """What the recognizer is scored against for a shard row: its phoneme ids without the unscored
    symbols (specials, word boundaries, punctuation, stress). ``symbols`` is the corpus's table."""
    mask = scored_mask(symbols)
    out = []
    for i in row_phonemes:
        i = int(i)
        if not 0 <= i < len(mask):
            raise ValueError(f"phoneme id {i} is outside the symbol table (ids 0..{len(mask) - 1})")
        if mask[i]:
            out.append(i)
    return out


def edit_distance(ref: Sequence[int], hyp: Sequence[int]) -> int:
    """Levenshtein distance: the fewest substitutions, deletions and insertions turning ``ref`` into ``hyp``."""
    ref, hyp = list(ref), list(hyp)
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i]
        for j, h in enumerate(hyp, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h)))
        prev = cur
    return prev[-1]


def phoneme_error_rate(refs: list[list[int]], hyps: list[list[int]]) -> float:
    """Corpus-level PER: the sum of edit distances over the sum of reference lengths (as WER is scored,
    so long utterances weigh more). Can exceed 1 when the hypotheses insert a lot."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses: one each is needed")
    total = sum(len(r) for r in refs)
    if total == 0:
        raise ValueError("the references hold no scored phonemes: a PER of nothing is undefined")
    return sum(edit_distance(r, h) for r, h in zip(refs, hyps, strict=True)) / total


def greedy_ctc_decode(best: Sequence[int]) -> list[int]:
    """Best class per frame -> symbol ids: repeats collapsed, then blanks removed."""
    out, last = [], None
    for c in best:
        c = int(c)
        if c != last and c != BLANK_ID:
            out.append(c)
        last = c
    return out


# ------------------------------------------------------------------------------------------------
# Model


@dataclass(frozen=True)
class RecognizerShape:
    """The network's size (stored in the file's metadata, so a load rebuilds the same network)."""

    num_codebooks: int
    codebook_size: int
    num_symbols: int
    dim: int = 128  # code embedding and convolution width
    hidden: int = 128  # LSTM units per direction
    layers: int = 2
    kernel: int = 5
    stride: int = 2
    dropout: float = 0.1


class RecognizerNet(nn.Module):
    """codes [B, Q, T] -> CTC log-probabilities [B, T', num_symbols] over the symbol table."""

    def __init__(self, shape: RecognizerShape, scored: np.ndarray):
        super().__init__()
        self.shape = shape
        # One table for all codebooks, offset per codebook: summing Q lookups is one gather.
        self.embed = nn.Embedding(shape.num_codebooks * shape.codebook_size, shape.dim)
        self.register_buffer(
            "offsets",
            torch.arange(shape.num_codebooks).view(1, -1, 1) * shape.codebook_size,
            persistent=False,
        )
        self.conv = nn.Conv1d(
            shape.dim, shape.dim, shape.kernel, stride=shape.stride, padding=shape.kernel // 2
        )
        self.norm = nn.LayerNorm(shape.dim)
        self.lstm = nn.LSTM(
            shape.dim,
            shape.hidden,
            num_layers=shape.layers,
            bidirectional=True,
            batch_first=True,
            dropout=shape.dropout if shape.layers > 1 else 0.0,
        )
        self.drop = nn.Dropout(shape.dropout)
        self.out = nn.Linear(2 * shape.hidden, shape.num_symbols)
        # Unscored symbols can never be emitted: their logits are pushed far below the rest.
        allowed = torch.as_tensor(scored, dtype=torch.bool).clone()
        allowed[BLANK_ID] = True
        self.register_buffer("mask_bias", torch.where(allowed, 0.0, -1e4), persistent=False)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        s = self.shape
        return (lengths + 2 * (s.kernel // 2) - s.kernel) // s.stride + 1

    def forward(self, codes: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        frames = codes.shape[-1]
        valid = torch.arange(frames).unsqueeze(0) < lengths.unsqueeze(1)  # [B, T]
        x = self.embed(codes + self.offsets).sum(1)  # [B, T, dim]
        # Padding frames are zeroed, i.e. what the convolution's own zero padding would see: an
        # utterance transcribes the same whatever else is in its batch.
        x = x * valid.unsqueeze(-1)
        x = torch.nn.functional.gelu(self.conv(x.transpose(1, 2))).transpose(1, 2)
        x = self.drop(self.norm(x))
        out_lengths = self.output_lengths(lengths)
        packed = nn.utils.rnn.pack_padded_sequence(x, out_lengths, batch_first=True, enforce_sorted=False)
        y, _ = self.lstm(packed)
        y, _ = nn.utils.rnn.pad_packed_sequence(y, batch_first=True, total_length=x.shape[1])
        logits = self.out(self.drop(y)) + self.mask_bias
        return logits.log_softmax(-1), out_lengths


def _pad_codes(codes: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([c.shape[1] for c in codes], dtype=torch.long)
    batch = torch.zeros(len(codes), codes[0].shape[0], int(lengths.max()), dtype=torch.long)
    for i, c in enumerate(codes):
        batch[i, :, : c.shape[1]] = torch.from_numpy(np.asarray(c, dtype=np.int64))
    return batch, lengths


# ------------------------------------------------------------------------------------------------
# The recognizer: a trained network and what it was made for


class Recognizer:
    """A trained recognizer and its metadata. ``meta`` holds ``valid_per`` ({lang: PER on that language's
    validation split}), ``symbols_fingerprint``, ``codec`` (the manifest's codec dict), ``num_codebooks``,
    ``steps`` and how it was trained."""

    def __init__(self, net: RecognizerNet, meta: dict):
        self.net = net.eval()
        self.meta = meta

    @property
    def shape(self) -> RecognizerShape:
        return self.net.shape

    # ---------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def transcribe(self, codes: list[np.ndarray], batch_size: int = 32) -> list[list[int]]:
        """Codes (int ``[Q, T]`` each) -> symbol ids each (greedy CTC; blanks and repeats collapsed; only
        scored symbols, see :func:`reference_phonemes`). Batched by length; the result does not
        depend on the batching."""
        q, size = self.shape.num_codebooks, self.shape.codebook_size
        mats = []
        for i, c in enumerate(codes):
            c = np.asarray(c)
            if c.ndim != 2 or c.shape[0] != q:
                raise ValueError(f"codes[{i}] has shape {c.shape}; this recognizer reads [{q}, frames]")
            if c.shape[1] == 0:
                mats.append(None)
                continue
            if c.min() < 0 or c.max() >= size:
                raise ValueError(
                    f"codes[{i}] holds values in [{c.min()}, {c.max()}]; this recognizer reads codes in [0, {size})"
                )
            mats.append(c)
        out: list[list[int]] = [[] for _ in codes]
        order = sorted((i for i, c in enumerate(mats) if c is not None), key=lambda i: mats[i].shape[1])
        was_training = self.net.training
        self.net.eval()
        try:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                batch, lengths = _pad_codes([mats[i] for i in idx])
                logp, out_lengths = self.net(batch, lengths)
                best = logp.argmax(-1)
                for row, i in enumerate(idx):
                    out[i] = greedy_ctc_decode(best[row, : int(out_lengths[row])].tolist())
        finally:
            self.net.train(was_training)
        return out

    def score(self, codes: list[np.ndarray], refs: list[list[int]]) -> float:
        """PER of this recognizer's transcriptions of ``codes`` against ``refs``."""
        return phoneme_error_rate(refs, self.transcribe(codes))

    # ---------------------------------------------------------------------------------- files
    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        torch.save({"state_dict": state, "meta": json.dumps(self.meta, sort_keys=True)}, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "recognizer") -> Recognizer:
        try:
            payload = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
            meta = json.loads(payload["meta"])
            shape = RecognizerShape(**meta["shape"])
            net = RecognizerNet(shape, np.asarray(meta["scored"], dtype=bool))
            net.load_state_dict(payload["state_dict"])
        except Exception as e:  # noqa: BLE001 - any corruption is the same problem for the user
            raise RecognizerError(
                f"{where}: not a readable vallex recognizer ({type(e).__name__}: {e}); "
                "re-run ray_jobs/recognizer.py to train it again"
            ) from None
        if meta.get("format") != FORMAT_VERSION:
            raise RecognizerError(
                f"{where}: recognizer format {meta.get('format')} but this vallex reads {FORMAT_VERSION}; "
                "re-run ray_jobs/recognizer.py"
            )
        return cls(net, meta)

    def save(self, prepared_dir: str) -> str:
        """Write ``recognizer.pt`` into ``prepared_dir`` (a folder or a URI), atomically; return its path."""
        path = join(str(prepared_dir), RECOGNIZER_FILE)
        write_bytes(path, self.to_bytes())
        return path

    @classmethod
    def load(cls, prepared_dir: str | os.PathLike, corpus: PreparedCorpus | None = None) -> Recognizer | None:
        """The recognizer saved beside the prepared corpus in ``prepared_dir``; None if there is none.

        Raises :class:`RecognizerError` (naming the file and what differs) if it was made for another
        symbol table or another codec than the corpus's: its transcriptions would mean nothing.
        """
        from vallex.data.corpus import PreparedCorpus

        corpus = corpus or PreparedCorpus.open(prepared_dir)
        path = join(corpus.root, RECOGNIZER_FILE)
        if not is_file(path):
            return None
        try:
            data = read_bytes(path)
        except OSError as e:
            raise RecognizerError(read_failure(path, e)) from None
        rec = cls.from_bytes(data, path)
        rec.check_matches(corpus, path)
        return rec

    def check_matches(self, corpus: PreparedCorpus, where: str = "recognizer") -> None:
        """Raise :class:`RecognizerError` if this recognizer was not made for ``corpus``'s symbols and codec."""
        fingerprint = symbols_fingerprint(corpus.symbols)
        if self.meta["symbols_fingerprint"] != fingerprint:
            raise RecognizerError(
                f"{where} was trained for symbol table {self.meta['symbols_fingerprint'][:19]}... "
                f"({self.meta['num_symbols']} symbols) but the corpus in {corpus.root} has "
                f"{fingerprint[:19]}... ({corpus.num_symbols} symbols; a language was added or the corpus "
                "re-prepared?); re-run ray_jobs/recognizer.py to train one for this corpus"
            )
        if self.meta["codec"] != corpus.codec:
            differ = sorted(
                k
                for k in set(self.meta["codec"]) | set(corpus.codec)
                if self.meta["codec"].get(k) != corpus.codec.get(k)
            )
            detail = ", ".join(
                f"{k}: {self.meta['codec'].get(k)!r} vs {corpus.codec.get(k)!r}" for k in differ
            )
            raise RecognizerError(
                f"{where} was trained on codes of another codec than the corpus in {corpus.root} "
                f"(recognizer vs manifest: {detail}); re-run ray_jobs/recognizer.py"
            )


# ------------------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class _Utterances:
    codes: list[np.ndarray]  # int16 [Q, T]
    refs: list[list[int]]
    languages: list[str]


def _read_split(corpus: PreparedCorpus, split: str, max_per_language: int = 0) -> tuple[_Utterances, dict]:
    """Every language's ``split`` rows as (codes, scored references); rows the CTC cannot learn from
    (no scored phoneme, or fewer output frames than the alignment needs) are counted, not used."""
    mask = scored_mask(corpus.symbols)
    codes, refs, langs = [], [], []
    skipped: dict[str, dict[str, int]] = {}
    for lang in corpus.languages:
        table = corpus.read_split(lang, split, columns=["phonemes", "codes", "frames", "num_codebooks"])
        if max_per_language:
            table = table.slice(0, max_per_language)
        rows = table.to_pydict()
        for ph, flat, frames, q in zip(
            rows["phonemes"], rows["codes"], rows["frames"], rows["num_codebooks"], strict=True
        ):
            ref = [i for i in ph if 0 <= i < len(mask) and mask[i]]
            # CTC needs one output frame per label, plus a blank between equal neighbours.
            need = len(ref) + sum(a == b for a, b in zip(ref, ref[1:], strict=False))
            out_frames = (frames - 1) // 2 + 1
            reason = (
                "no scored phoneme"
                if not ref
                else ("too short for its phonemes" if out_frames < need else "")
            )
            if reason:
                skipped.setdefault(lang, {}).setdefault(reason, 0)
                skipped[lang][reason] += 1
                continue
            codes.append(codes_matrix(np.asarray(flat, dtype=np.int16), frames, q))
            refs.append(ref)
            langs.append(lang)
    return _Utterances(codes, refs, langs), skipped


def _length_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of batches of similar length (little padding), in a random order: rows sorted by
    length after a random shuffle (ties broken at random), cut into runs of ``batch_size``."""
    perm = rng.permutation(len(lengths))
    order = perm[np.argsort(lengths[perm], kind="stable")]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def per_language(rec: Recognizer, data: _Utterances) -> dict[str, float]:
    """The recognizer's PER on ``data``, per language (sorted)."""
    hyps = rec.transcribe(data.codes)
    out = {}
    for lang in sorted(set(data.languages)):
        idx = [i for i, lang_i in enumerate(data.languages) if lang_i == lang]
        out[lang] = phoneme_error_rate([data.refs[i] for i in idx], [hyps[i] for i in idx])
    return out


def train_recognizer(
    corpus: PreparedCorpus,
    steps: int = 1000,
    batch_size: int = 16,
    lr: float = 2e-3,
    seed: int = 0,
    *,
    dim: int = 128,
    hidden: int = 128,
    layers: int = 2,
    dropout: float = 0.1,
    threads: int = 0,
    max_utterances: int = 0,
    log_every: int = 100,
) -> Recognizer:
    """Train a recognizer on every language's train split of ``corpus`` and score it on each language's
    validation split (``meta["valid_per"]``). Deterministic for a ``seed`` on CPU. Does not save it.

    ``threads`` > 0 sets torch's CPU threads for the run; ``max_utterances`` > 0 caps the training rows
    read per language; a line with the loss and elapsed time is logged every ``log_every`` steps.
    """
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"steps ({steps}) and batch_size ({batch_size}) must be >= 1 and lr ({lr}) > 0")
    before_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train(
            corpus, steps, batch_size, lr, seed, dim, hidden, layers, dropout, max_utterances, log_every
        )
    finally:
        torch.set_num_threads(before_threads)


def _train(corpus, steps, batch_size, lr, seed, dim, hidden, layers, dropout, max_utterances, log_every):
    t0 = time.perf_counter()
    train, skipped = _read_split(corpus, "train", max_utterances)
    valid, valid_skipped = _read_split(corpus, "valid")
    if not train.codes:
        raise ValueError(
            f"{corpus.root}: no training utterance the recognizer can learn from (skipped: {skipped})"
        )
    for lang, reasons in sorted(skipped.items()):
        log.warning("recognizer: %s: skipped training rows %s", lang, reasons)
    counts = {lang: train.languages.count(lang) for lang in corpus.languages}
    log.info(
        "recognizer: %d training utterances (%s), %d validation; read in %.1f s",
        len(train.codes),
        ", ".join(f"{k} {v}" for k, v in counts.items()),
        len(valid.codes),
        time.perf_counter() - t0,
    )

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    scored = scored_mask(corpus.symbols)
    shape = RecognizerShape(
        num_codebooks=corpus.num_codebooks,
        codebook_size=int(corpus.codec.get("codebook_size", 1024)),
        num_symbols=corpus.num_symbols,
        dim=dim,
        hidden=hidden,
        layers=layers,
        dropout=dropout,
    )
    net = RecognizerNet(shape, scored)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, min(steps // 20, 100))

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    ctc = nn.CTCLoss(blank=BLANK_ID, reduction="sum", zero_infinity=True)
    lengths = np.array([c.shape[1] for c in train.codes])
    batches: list[np.ndarray] = []
    net.train()
    running, seen, t_train = 0.0, 0, time.perf_counter()
    for step in range(steps):
        if not batches:
            batches = _length_batches(lengths, batch_size, rng)
        idx = batches.pop()
        codes, code_lengths = _pad_codes([train.codes[i] for i in idx])
        targets = torch.tensor([p for i in idx for p in train.refs[i]], dtype=torch.long)
        target_lengths = torch.tensor([len(train.refs[i]) for i in idx], dtype=torch.long)
        logp, out_lengths = net(codes, code_lengths)
        # Loss per target phoneme (not per utterance): long and short utterances weigh by content.
        loss = ctc(logp.transpose(0, 1), targets, out_lengths, target_lengths) / target_lengths.sum()
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        running += loss.item()
        seen += 1
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            log.info(
                "recognizer step %d/%d  ctc loss %.3f per phoneme  %.1f s",
                step + 1,
                steps,
                running / seen,
                time.perf_counter() - t_train,
            )
            running, seen = 0.0, 0
    train_seconds = time.perf_counter() - t_train

    meta = {
        "format": FORMAT_VERSION,
        "symbols_fingerprint": symbols_fingerprint(corpus.symbols),
        "num_symbols": corpus.num_symbols,
        "codec": corpus.codec,
        "num_codebooks": corpus.num_codebooks,
        "shape": asdict(shape),
        "scored": scored.tolist(),
        "scored_definition": "phones and tones; not specials, word boundaries, punctuation, stress marks",
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "train_utterances": counts,
        "train_skipped": skipped,
        "train_seconds": round(train_seconds, 1),
        "valid_utterances": {lang: valid.languages.count(lang) for lang in corpus.languages},
        "valid_skipped": valid_skipped,
        "valid_per": {},
    }
    rec = Recognizer(net, meta)
    if valid.codes:
        meta["valid_per"] = per_language(rec, valid)
    missing = [lang for lang in corpus.languages if lang not in meta["valid_per"]]
    if missing:
        log.warning("recognizer: no validation utterances to score for %s", missing)
    return rec


def per_table(meta: dict) -> str:
    """The per-language validation PER of a recognizer's metadata, as a small text table."""
    lines = [f"{'language':<10}{'valid PER':>10}{'utterances':>12}"]
    for lang, n in sorted(meta["valid_utterances"].items()):
        per = meta["valid_per"].get(lang)
        lines.append(f"{lang:<10}{'-' if per is None else f'{100 * per:.1f}%':>10}{n:>12}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# On Ray, from a config


def _train_and_save(prepared_dir: str, settings: dict, seed: int) -> dict:
    """Ray task body: train on the corpus in ``prepared_dir``, save beside it, return the metadata."""
    from vallex.data.corpus import PreparedCorpus
    from vallex.logs import setup_logging

    setup_logging()  # a Ray worker has no vallex handler: its progress lines go to its log
    corpus = PreparedCorpus.open(prepared_dir)
    rec = train_recognizer(corpus, seed=seed, **settings)
    path = rec.save(corpus.root)
    log.info("recognizer saved to %s", path)
    return rec.meta


def train_recognizer_on_ray(cfg: Config) -> dict:
    """Train the recognizer as a Ray task on the prepared corpus of ``cfg`` and save it beside the
    shards; return its metadata. Joins the running Ray cluster (``vallex.runtime.init_ray``)."""
    import ray

    rc = cfg.recognizer
    settings = {
        "steps": rc.steps,
        "batch_size": rc.batch_size,
        "lr": rc.lr,
        "dim": rc.dim,
        "hidden": rc.hidden,
        "threads": rc.cpus,
        "max_utterances": rc.max_utterances,
        "log_every": rc.log_every,
    }
    log.info(
        "training the phoneme recognizer on %s (%d steps x %d utterances, %d CPU) as a Ray task",
        cfg.prepare_dir,
        rc.steps,
        rc.batch_size,
        rc.cpus,
    )
    task = ray.remote(num_cpus=rc.cpus, max_retries=0)(_train_and_save)
    meta = ray.get(task.remote(cfg.prepare_dir, settings, cfg.run.seed))
    log.info(
        "recognizer trained in %.0f s; validation PER per language:\n%s",
        meta["train_seconds"],
        per_table(meta),
    )
    return meta


def ensure_recognizer(cfg: Config) -> dict:
    """The demo's stage after preparation: the metadata of the recognizer beside ``cfg``'s prepared corpus,
    trained first (on Ray) if there is none or it was made for another symbol table or codec."""
    try:
        rec = Recognizer.load(cfg.prepare_dir)
    except RecognizerError as e:
        log.warning("recognizer: %s; training a new one", e)
        rec = None
    if rec is not None:
        log.info("recognizer found beside the shards; validation PER:\n%s", per_table(rec.meta))
        return rec.meta
    return train_recognizer_on_ray(cfg)
