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

Model (``RecognizerNet``): a vector per frame, the sum over its Q codes of the codec's own code vectors
(frozen, then a linear layer: ``inputs="features"``, what ``recognizer.inputs=auto`` picks for mel_rvq and
EnCodec) or of a learned embedding per codebook (``inputs="codes"``); a strided 1-D convolution
(75 Hz -> 37.5 Hz: phones last several frames, and half the frames halve the encoder's cost; codes at
37.5 Hz or less keep every frame, stride 1, so CTC still has a step per phone and blank), a small
transformer encoder (4 layers, 4 heads, pre-norm, sinusoidal positions; a 2-layer bidirectional LSTM is
the alternative, ~5x dearer per step on CPU), and a linear layer over the symbol table whose ``<pad>``
slot (id 0, never a target) is the CTC blank. Why the codec's vectors: a learned embedding weighs a
codebook by what it predicted on ground-truth codes, however little it changes the sound, so a
synthesizer's wrong code in a fine codebook made clear speech unreadable (synthesized PER ~100% on the
demo; with the codec's vectors a code weighs what it does to the sound; docs/BENCHMARKS.md).

The file is ``torch.save({"state_dict": ..., "meta": <JSON text>})`` and is only ever read with
``torch.load(weights_only=True)``: tensors and strings, nothing that can run code.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from vallex.codec.encodec import CodecError
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
RECOGNIZER_INPUTS = ("auto", "features", "codes")
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
    symbols (specials, word boundaries, punctuation, stress). ``symbols`` is the corpus's table
    (``PreparedCorpus.symbols``); :meth:`Recognizer.reference_phonemes` uses the recognizer's own."""
    return _keep_scored(row_phonemes, scored_mask(symbols))


def _keep_scored(row_phonemes: Sequence[int], scored: Sequence[bool]) -> list[int]:
    out = []
    for i in row_phonemes:
        i = int(i)
        if not 0 <= i < len(scored):
            raise ValueError(f"phoneme id {i} is outside the symbol table (ids 0..{len(scored) - 1})")
        if scored[i]:
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
    dim: int = 128  # code embedding, convolution and transformer width
    hidden: int = 128  # transformer: half the feed-forward width; LSTM: units per direction
    layers: int = 4
    encoder: str = "transformer"  # or "lstm" (bidirectional); the transformer is ~5x cheaper per step on CPU
    kernel: int = 5
    stride: int = 2
    dropout: float = 0.1
    features: int = 0  # 0: a learned embedding per codebook; > 0: the codec's own code vectors of this width


def conv_stride(codec: dict) -> int:
    """2 for codes at >= 50 frames/s (EnCodec's 75 Hz -> 37.5 Hz), 1 below (a 25 Hz frame is ~half a phone)."""
    return 2 if float(codec.get("frame_rate", 75)) >= 50 else 1


def output_frames(frames, shape: RecognizerShape):
    """Frames after the strided convolution (an int or a tensor): the CTC's time steps."""
    return (frames + 2 * (shape.kernel // 2) - shape.kernel) // shape.stride + 1


class RecognizerNet(nn.Module):
    """codes [B, Q, T] -> CTC log-probabilities [B, T', num_symbols] over the symbol table.

    What a frame's Q codes become (``shape.features``): 0 = a learned embedding per codebook, summed;
    > 0 = the codec's own code vectors (``codec_vectors``, Float[Q, codebook_size, features], frozen),
    summed: the quantized frame the codec's decoder turns into sound, then a linear layer. With learned
    embeddings every codebook weighs what it helped on ground-truth codes, however little it changes
    the sound: a fine codebook's wrong code (a synthesizer's) can then make a clear frame unreadable.
    With the codec's vectors a wrong code moves the frame by as much as it moves the sound.
    """

    def __init__(self, shape: RecognizerShape, scored: np.ndarray, codec_vectors: np.ndarray | None = None):
        super().__init__()
        self.shape = shape
        rows = shape.num_codebooks * shape.codebook_size
        if shape.features:
            # A buffer, saved in the file: a recognizer reads codes without opening the codec.
            vectors = torch.zeros(rows, shape.features)
            if codec_vectors is not None:
                want = (shape.num_codebooks, shape.codebook_size, shape.features)
                if tuple(codec_vectors.shape) != want:
                    raise ValueError(
                        f"codec vectors have shape {tuple(codec_vectors.shape)}, expected {want}"
                    )
                vectors = torch.as_tensor(np.asarray(codec_vectors, dtype=np.float32)).reshape(rows, -1)
            self.register_buffer("codec_vectors", vectors.clone())
            self.project = nn.Linear(shape.features, shape.dim)
        else:
            # One table for all codebooks, offset per codebook: summing Q lookups is one gather.
            self.embed = nn.Embedding(rows, shape.dim)
        self.register_buffer(
            "offsets",
            torch.arange(shape.num_codebooks).view(1, -1, 1) * shape.codebook_size,
            persistent=False,
        )
        self.conv = nn.Conv1d(
            shape.dim, shape.dim, shape.kernel, stride=shape.stride, padding=shape.kernel // 2
        )
        self.norm = nn.LayerNorm(shape.dim)
        if shape.encoder == "lstm":
            self.lstm = nn.LSTM(
                shape.dim,
                shape.hidden,
                num_layers=shape.layers,
                bidirectional=True,
                batch_first=True,
                dropout=shape.dropout if shape.layers > 1 else 0.0,
            )
            width = 2 * shape.hidden
        elif shape.encoder == "transformer":
            layer = nn.TransformerEncoderLayer(
                shape.dim,
                nhead=4,
                dim_feedforward=2 * shape.hidden,
                dropout=shape.dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            self.transformer = nn.TransformerEncoder(layer, shape.layers, enable_nested_tensor=False)
            width = shape.dim
        else:
            raise ValueError(f"encoder {shape.encoder!r}: must be 'lstm' or 'transformer'")
        self.drop = nn.Dropout(shape.dropout)
        self.out = nn.Linear(width, shape.num_symbols)
        # Unscored symbols can never be emitted: their logits are pushed far below the rest.
        allowed = torch.as_tensor(scored, dtype=torch.bool).clone()
        allowed[BLANK_ID] = True
        self.register_buffer("mask_bias", torch.where(allowed, 0.0, -1e4), persistent=False)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return output_frames(lengths, self.shape)

    def embed_frames(self, codes: torch.Tensor, codebooks: int | None = None) -> torch.Tensor:
        """codes [B, Q, T] -> one vector per frame [B, T, dim]: the first ``codebooks`` (default all)
        codebooks' embeddings (or codec vectors, projected) summed; the others left out."""
        idx = (codes + self.offsets)[:, :codebooks]
        if self.shape.features:
            return self.project(nn.functional.embedding(idx, self.codec_vectors).sum(1))
        return self.embed(idx).sum(1)

    def forward(
        self, codes: torch.Tensor, lengths: torch.Tensor, codebooks: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        frames = codes.shape[-1]
        valid = torch.arange(frames).unsqueeze(0) < lengths.unsqueeze(1)  # [B, T]
        x = self.embed_frames(codes, codebooks)  # [B, T, dim]
        # Padding frames are zeroed, i.e. what the convolution's own zero padding would see: an
        # utterance transcribes the same whatever else is in its batch.
        x = x * valid.unsqueeze(-1)
        x = torch.nn.functional.gelu(self.conv(x.transpose(1, 2))).transpose(1, 2)
        x = self.drop(self.norm(x))
        out_lengths = self.output_lengths(lengths)
        if self.shape.encoder == "lstm":
            # Packed: the backward direction starts at each utterance's own last frame, not at padding.
            packed = nn.utils.rnn.pack_padded_sequence(x, out_lengths, batch_first=True, enforce_sorted=False)
            y, _ = self.lstm(packed)
            y, _ = nn.utils.rnn.pad_packed_sequence(y, batch_first=True, total_length=x.shape[1])
        else:
            padding = torch.arange(x.shape[1]).unsqueeze(0) >= out_lengths.unsqueeze(1)
            y = self.transformer(x + _sinusoids(x.shape[1], x.shape[2]), src_key_padding_mask=padding)
        logits = self.out(self.drop(y)) + self.mask_bias
        return logits.log_softmax(-1), out_lengths


def _sinusoids(length: int, dim: int) -> torch.Tensor:
    """Fixed sinusoidal positions [length, dim] (Vaswani et al. 2017)."""
    pos = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    out = torch.zeros(length, dim)
    out[:, 0::2] = torch.sin(pos * freq)
    out[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return out


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

    def reference_phonemes(self, row_phonemes: Sequence[int]) -> list[int]:
        """:func:`reference_phonemes` with the symbol table this recognizer was trained on (which
        :meth:`load` has checked is the corpus's): what its transcriptions are scored against."""
        return _keep_scored(row_phonemes, self.meta["scored"])

    # ---------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def transcribe(
        self, codes: list[np.ndarray], batch_size: int = 32, codebooks: int | None = None
    ) -> list[list[int]]:
        """Codes (int ``[Q, T]`` each) -> symbol ids each (greedy CTC; blanks and repeats collapsed; only
        scored symbols, see :func:`reference_phonemes`). Batched by length; the result does not
        depend on the batching. ``codebooks``: read only the first that many (a diagnosis: how much
        the transcription leans on the later ones)."""
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
                logp, out_lengths = self.net(batch, lengths, codebooks)
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


def _read_split(
    corpus: PreparedCorpus, split: str, shape: RecognizerShape, max_per_language: int = 0
) -> tuple[_Utterances, dict]:
    """Every language's ``split`` rows as (codes, scored references). Rows without a scored phoneme, and
    training rows with fewer output frames than a CTC alignment needs, are counted, not used."""
    mask = scored_mask(corpus.symbols)
    codes, refs, langs = [], [], []
    skipped: dict[str, dict[str, int]] = {}
    for lang in corpus.languages:
        table = corpus.read_split(lang, split, columns=["phonemes", "codes", "frames", "num_codebooks"])
        if max_per_language:
            table = table.slice(0, max_per_language)
        rows = table.to_pydict()
        for k, (ph, flat, frames, q) in enumerate(
            zip(rows["phonemes"], rows["codes"], rows["frames"], rows["num_codebooks"], strict=True)
        ):
            try:
                ref = _keep_scored(ph, mask)
            except ValueError as e:
                raise ValueError(
                    f"{corpus.root}: {lang} {split} row {k}: {e}; re-run ray_jobs/prepare.py"
                ) from None
            # CTC needs one output frame per label, plus a blank between equal neighbours. A
            # validation row that is too short stays: it is scored (its misses count), only not learnt.
            need = len(ref) + sum(a == b for a, b in zip(ref, ref[1:], strict=False))
            reason = "no scored phoneme" if not ref else ""
            if split == "train" and output_frames(frames, shape) < need:
                reason = "too short for its phonemes"
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


def _epoch_pool(languages: list[str], alpha: float) -> np.ndarray:
    """Row indices of one epoch: each language's rows repeated ``round((n_max / n) ** (1 - alpha))``
    times, so a language's share goes as n ** alpha (as ``data.alpha``): a small language is seen
    often enough to be learnt (alpha 1 = as many times as it has rows, 0 = every language equally)."""
    counts = {lang: languages.count(lang) for lang in set(languages)}
    most = max(counts.values())
    repeats = {lang: max(1, round((most / n) ** (1 - alpha))) for lang, n in counts.items()}
    return np.array([i for i, lang in enumerate(languages) for _ in range(repeats[lang])], dtype=np.int64)


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
    layers: int = 4,
    encoder: str = "transformer",
    dropout: float = 0.1,
    inputs: str = "codes",
    threads: int = 0,
    max_utterances: int = 0,
    alpha: float = 0.5,
    log_every: int = 100,
    eval_every: int = 0,
    progress: Callable[[str], None] | None = None,
) -> Recognizer:
    """Train a recognizer on every language's train split of ``corpus`` and score it on each language's
    validation split (``meta["valid_per"]``). Deterministic for a ``seed`` on CPU. Does not save it.

    ``threads`` > 0 sets torch's CPU threads for the run; ``max_utterances`` > 0 caps the training rows
    read per language; ``alpha`` sets how often a small language's rows are seen (a language's share
    of the batches goes as n ** alpha, see ``_epoch_pool``); a line with the loss and elapsed time goes to ``progress`` (default: the
    ``vallex.eval`` logger) every ``log_every`` steps (0 = none). ``eval_every`` > 0 also scores the
    validation splits every that many steps (``meta["curve"]``: step, training seconds, PER per language).
    ``inputs``: ``codes`` (a learned embedding per codebook), ``features`` (the corpus codec's own code
    vectors, frozen: see :class:`RecognizerNet`; the codec must give them, ``code_vectors()``) or
    ``auto`` (features when the codec gives them, else codes, saying why).
    """
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"steps ({steps}) and batch_size ({batch_size}) must be >= 1 and lr ({lr}) > 0")
    if inputs not in RECOGNIZER_INPUTS:
        raise ValueError(f"recognizer inputs {inputs!r}: must be one of {RECOGNIZER_INPUTS}")
    vectors = None
    if inputs != "codes":
        try:
            vectors = codec_vectors(corpus)
        except (CodecError, ValueError) as e:
            if inputs == "features":
                raise
            (progress or log.info)(f"recognizer: reading learned code embeddings, not codec features: {e}")
    before_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train(
            corpus,
            steps,
            batch_size,
            lr,
            seed,
            RecognizerShape(
                num_codebooks=corpus.num_codebooks,
                codebook_size=int(corpus.codec.get("codebook_size", 1024)),
                num_symbols=corpus.num_symbols,
                dim=dim,
                hidden=hidden,
                layers=layers,
                encoder=encoder,
                dropout=dropout,
                stride=conv_stride(corpus.codec),
                features=0 if vectors is None else int(vectors.shape[-1]),
            ),
            max_utterances,
            alpha,
            log_every,
            eval_every,
            progress or log.info,
            vectors,
        )
    finally:
        torch.set_num_threads(before_threads)


def codec_vectors(corpus: PreparedCorpus) -> np.ndarray:
    """The corpus codec's code vectors, Float32[Q, codebook_size, features] (``code_vectors()`` of the
    tokenizer the manifest names: mel_rvq's centroids, EnCodec's quantizer vectors)."""
    from vallex.codec import open_tokenizer

    name = corpus.codec.get("kind") or corpus.codec.get("name", "")
    if not (name == "mel_rvq" or name.startswith("encodec")):
        raise ValueError(f"the codes of {corpus.root} were made by {name!r}, not a codec with code vectors")
    tokenizer = open_tokenizer(corpus.codec, corpus.root)
    if not hasattr(tokenizer, "code_vectors"):
        raise ValueError(
            f"the codec of {corpus.root} ({corpus.codec.get('kind', corpus.codec.get('name'))}) gives no code "
            "vectors: train the recognizer with recognizer.inputs=codes"
        )
    vectors = np.asarray(tokenizer.code_vectors(), dtype=np.float32)
    want = (corpus.num_codebooks, int(corpus.codec.get("codebook_size", 1024)))
    if vectors.ndim != 3 or vectors.shape[:2] != want:
        raise ValueError(
            f"the codec of {corpus.root} gives code vectors of shape {vectors.shape}, expected {want} + (features,)"
        )
    return vectors


def _train(
    corpus,
    steps,
    batch_size,
    lr,
    seed,
    shape,
    max_utterances,
    alpha,
    log_every,
    eval_every,
    say,
    vectors=None,
):
    t0 = time.perf_counter()
    train, skipped = _read_split(corpus, "train", shape, max_utterances)
    valid, valid_skipped = _read_split(corpus, "valid", shape)
    if not train.codes:
        raise ValueError(
            f"{corpus.root}: no training utterance the recognizer can learn from (skipped: {skipped})"
        )
    for lang, reasons in sorted(skipped.items()):
        say(f"recognizer: WARNING: {lang}: training rows skipped: {reasons}")
    counts = {lang: train.languages.count(lang) for lang in corpus.languages}
    say(
        f"recognizer: {len(train.codes)} training utterances "
        f"({', '.join(f'{k} {v}' for k, v in counts.items())}), {len(valid.codes)} validation; "
        f"read in {time.perf_counter() - t0:.1f} s"
    )

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    scored = scored_mask(corpus.symbols)
    net = RecognizerNet(shape, scored, vectors)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, min(steps // 20, 100))

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    ctc = nn.CTCLoss(blank=BLANK_ID, reduction="sum", zero_infinity=True)
    pool = _epoch_pool(train.languages, alpha)
    lengths = np.array([train.codes[i].shape[1] for i in pool])
    batches: list[np.ndarray] = []
    net.train()
    running, seen, t_train, eval_seconds, curve = 0.0, 0, time.perf_counter(), 0.0, []
    for step in range(steps):
        if not batches:
            batches = _length_batches(lengths, batch_size, rng)
        idx = pool[batches.pop()]
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
            say(
                f"recognizer step {step + 1}/{steps}  ctc loss {running / seen:.3f} per phoneme  "
                f"{time.perf_counter() - t_train:.1f} s"
            )
            running, seen = 0.0, 0
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps and valid.codes:
            seconds = time.perf_counter() - t_train - eval_seconds
            t_eval = time.perf_counter()
            curve.append(
                {
                    "step": step + 1,
                    "seconds": round(seconds, 1),
                    "valid_per": per_language(Recognizer(net, {}), valid),
                }
            )
            net.train()
            eval_seconds += time.perf_counter() - t_eval
            say(
                f"recognizer step {step + 1}/{steps}  validation PER "
                + "  ".join(f"{k} {100 * v:.1f}%" for k, v in curve[-1]["valid_per"].items())
            )
    train_seconds = time.perf_counter() - t_train - eval_seconds

    meta = {
        "format": FORMAT_VERSION,
        "symbols_fingerprint": symbols_fingerprint(corpus.symbols),
        "num_symbols": corpus.num_symbols,
        "codec": corpus.codec,
        "num_codebooks": corpus.num_codebooks,
        "shape": asdict(shape),
        "inputs": "features" if shape.features else "codes",
        "scored": scored.tolist(),
        "scored_definition": "phones and tones; not specials, word boundaries, punctuation, stress marks",
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "alpha": alpha,
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
        curve.append({"step": steps, "seconds": meta["train_seconds"], "valid_per": meta["valid_per"]})
    meta["curve"] = curve
    missing = [lang for lang in corpus.languages if lang not in meta["valid_per"]]
    if missing:
        say(f"recognizer: WARNING: no validation utterances to score for {missing}")
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


class _RecognizerJob:
    """A Ray actor that trains the recognizer and keeps its progress lines for the driver to print
    (two concurrent calls: ``run`` trains while ``drain`` hands over the lines so far)."""

    def __init__(self):
        self._lines: list[str] = []
        self._lock = threading.Lock()

    def _say(self, line: str) -> None:
        with self._lock:
            self._lines.append(line)

    def drain(self) -> list[str]:
        with self._lock:
            lines, self._lines = self._lines, []
        return lines

    def run(self, prepared_dir: str, settings: dict, seed: int) -> dict:
        """Train on the corpus in ``prepared_dir``, save beside it, return the metadata."""
        from vallex.data.corpus import PreparedCorpus

        corpus = PreparedCorpus.open(prepared_dir)
        rec = train_recognizer(corpus, seed=seed, progress=self._say, **settings)
        self._say(f"recognizer saved to {rec.save(corpus.root)}")
        return rec.meta


def train_recognizer_on_ray(cfg: Config) -> dict:
    """Train the recognizer in a Ray actor on the prepared corpus of ``cfg``, save it beside the shards
    and return its metadata; its progress lines are printed here. Needs a connected Ray
    (``vallex.runtime.init_ray``)."""
    import ray

    rc = cfg.recognizer
    settings = {
        "steps": rc.steps,
        "batch_size": rc.batch_size,
        "lr": rc.lr,
        "dim": rc.dim,
        "hidden": rc.hidden,
        "layers": rc.layers,
        "encoder": rc.encoder,
        "inputs": rc.inputs,
        "threads": rc.cpus,
        "max_utterances": rc.max_utterances,
        "alpha": rc.alpha,
        "log_every": rc.log_every,
        "eval_every": rc.eval_every,
    }
    log.info(
        "training the phoneme recognizer on %s (%d steps x %d utterances, %d CPU) on Ray",
        cfg.prepared_dir,
        rc.steps,
        rc.batch_size,
        rc.cpus,
    )
    job = ray.remote(num_cpus=rc.cpus, max_concurrency=2, max_restarts=0)(_RecognizerJob).remote()
    try:
        result = job.run.remote(cfg.prepared_dir, settings, cfg.run.seed)
        done = False
        while not done:
            done = bool(ray.wait([result], timeout=2.0)[0])
            for line in ray.get(job.drain.remote()):
                log.info(line)
        meta = ray.get(result)
    finally:
        ray.kill(job)
    log.info(
        "recognizer trained in %.0f s; validation PER per language (ground-truth codes):\n%s",
        meta["train_seconds"],
        per_table(meta),
    )
    return meta


def ensure_recognizer(cfg: Config) -> dict:
    """The demo's stage after preparation: the metadata of the recognizer beside ``cfg``'s prepared corpus,
    trained first (on Ray) if there is none or it was made for another symbol table or codec."""
    try:
        rec = Recognizer.load(cfg.prepared_dir)
    except RecognizerError as e:
        log.warning("recognizer: %s; training a new one", e)
        rec = None
    wanted = cfg.recognizer.inputs
    if rec is not None and wanted != "auto" and rec.meta.get("inputs", "codes") != wanted:
        log.warning(
            "recognizer: the one beside the shards reads %s, recognizer.inputs asks for %s; training a new one",
            rec.meta.get("inputs", "codes"),
            cfg.recognizer.inputs,
        )
        rec = None
    if rec is not None:
        log.info("recognizer found beside the shards; validation PER:\n%s", per_table(rec.meta))
        return rec.meta
    return train_recognizer_on_ray(cfg)
