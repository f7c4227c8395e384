"""A speech tokenizer fitted to the corpus: residual k-means over normalized log-mel frames.

Why it exists. Pretrained EnCodec weights cannot be downloaded on an air-gapped machine, and a
random-init EnCodec loses the speech: a small CTC phoneme recognizer reads ~70% of phonemes wrong from
its codes. Fitting a tokenizer to the corpus's own audio keeps the words: on the same recognizer and
budget these codes give ~23% (numbers and command in the project's report). It has the shape of
EnCodec's codes at 6 kbps, so nothing downstream changes: ``num_codebooks`` (8) residual codebooks of
1024 entries at 75 frames/s, int16 ``[Q, T]`` with ``T = ceil(samples * 75 / 24000)``.

Frame rate. 75 Hz (hop 320) is EnCodec's shape and the default. ``frame_rate`` 50, 37.5 or 25 (hop
480, 640, 960) makes every sequence 1.5-3x shorter: the AR then sees each phone in fewer, richer frames,
which is what lets the 2-core demo's model learn to read in minutes (docs/BENCHMARKS.md "Demo"). Losses
and text gains per frame at another rate are not comparable with 75 Hz figures (a frame is another
length of speech); the manifest's ``codec.frame_rate`` says which.

Encode: 24 kHz audio -> 80-bin log-mel power spectrogram (1024-point FFT, hop 320) -> per-bin
normalization (mean and std fitted on the corpus) -> stage k picks the centroid nearest to what
stages < k left unexplained (residual vector quantization, as EnCodec's RVQ does with learned vectors).
Decode: sum of the chosen centroids -> de-normalize -> mel power -> linear spectrogram through the
filterbank's pseudo-inverse -> Griffin-Lim. Audible and mostly intelligible; it is for listening, not
for production TTS (real EnCodec remains that path).

Fit (:func:`fit_tables`): a seeded sample of frames from the training split; per stage, Lloyd
iterations from seeded random centroids, dead centroids re-seeded from the worst-fitted frames. Same
audio + same settings -> identical tables (checked by ``tests/codec/test_mel_rvq.py``).

The fitted tables are one ``.npz`` of plain float32 arrays plus the settings as JSON text, loaded with
``allow_pickle=False`` (nothing read from storage can run code) and checked against the sha256 the
manifest recorded.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
import zipfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

from vallex.codec.encodec import CODEBOOK_SIZE, FRAME_RATE, SAMPLE_RATE, CodecError

log = logging.getLogger("vallex.codec")

KIND = "mel_rvq"
FITTED_NAME = "codec_mel_rvq.npz"  # beside manifest.json in the prepared corpus
TABLES_VERSION = 1
FRAME_RATES = (75.0, 50.0, 37.5, 25.0)  # whole hops at 24 kHz: 320, 480, 640, 960 samples
N_FFT = 1024
LOG_FLOOR = 1e-5  # log(mel + floor): keeps digital silence finite
GRIFFIN_LIM_ITERS = 32


@dataclass(frozen=True)
class MelRVQSettings:
    """What defines the tokenizer (all of it goes into the manifest's ``codec`` dict)."""

    num_codebooks: int = 8
    n_mels: int = 80
    seed: int = 0
    fit_frames: int = 40_000  # frames the k-means sees (a seeded sample of the training split)
    fit_iterations: int = 10  # Lloyd iterations per stage
    fit_utterances: int = 400  # training utterances read for the fit (a seeded sample)
    frame_rate: float = (
        FRAME_RATE  # code frames per second: 75 (EnCodec's) or 50, 37.5, 25 (shorter sequences)
    )

    def __post_init__(self):
        if float(self.frame_rate) not in FRAME_RATES:
            raise ValueError(
                f"mel_rvq frame_rate must be one of {FRAME_RATES} (a whole hop of 24 kHz samples), "
                f"got {self.frame_rate}"
            )
        for key in ("num_codebooks", "n_mels", "fit_iterations", "fit_utterances"):
            if getattr(self, key) < 1:
                raise ValueError(f"mel_rvq {key} must be >= 1, got {getattr(self, key)}")
        if self.fit_frames < CODEBOOK_SIZE:
            raise ValueError(
                f"mel_rvq fit_frames must be >= {CODEBOOK_SIZE} (one frame per centroid), got {self.fit_frames}"
            )

    @property
    def hop_length(self) -> int:
        """Samples per code frame at 24 kHz."""
        return round(SAMPLE_RATE / self.frame_rate)

    def to_dict(self) -> dict:
        """The manifest's description (``fitted``/``sha256`` are added once the tables exist)."""
        rate = float(self.frame_rate)
        return {
            "kind": KIND,
            "name": KIND,
            "sample_rate": SAMPLE_RATE,
            "codebook_size": CODEBOOK_SIZE,
            **asdict(self),
            # 75, not 75.0: the same JSON (and table bytes) as files written before the rate was a setting
            "frame_rate": int(rate) if rate.is_integer() else rate,
        }

    @classmethod
    def from_dict(cls, d: dict) -> MelRVQSettings:
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**fields)


# ------------------------------------------------------------------------------------------------
# Features


class _Mel:
    """torchaudio's mel front end and its pseudo-inverse, built once per process and size."""

    _cache: dict[tuple[int, int], _Mel] = {}

    def __init__(self, n_mels: int, hop_length: int):
        import torch
        import torchaudio

        self.transform = torchaudio.transforms.MelSpectrogram(
            sample_rate=SAMPLE_RATE,
            n_fft=N_FFT,
            hop_length=hop_length,
            n_mels=n_mels,
            power=2.0,
            center=True,
            pad_mode="constant",  # zeros at the edges, as in the clip's own padding; works for 1-sample clips
        )
        fb = self.transform.mel_scale.fb  # [n_freqs, n_mels]
        self.inverse = torch.linalg.pinv(fb.double()).float()  # [n_mels, n_freqs]

    @classmethod
    def get(cls, n_mels: int, hop_length: int) -> _Mel:
        if (n_mels, hop_length) not in cls._cache:
            cls._cache[n_mels, hop_length] = cls(n_mels, hop_length)
        return cls._cache[n_mels, hop_length]


def log_mel(wav: np.ndarray, n_mels: int, hop_length: int = SAMPLE_RATE // FRAME_RATE) -> np.ndarray:
    """float32 ``[ceil(len(wav) / hop_length), n_mels]``: frame t is centred on sample t * hop_length of
    the clip zero-padded to whole frames (one clip at a time, so a clip's frames never depend on its batch)."""
    import torch

    t = -(-len(wav) // hop_length)
    x = torch.zeros(t * hop_length)
    x[: len(wav)] = torch.from_numpy(np.asarray(wav, dtype=np.float32))
    with torch.inference_mode():
        mel = _Mel.get(n_mels, hop_length).transform(x)  # [n_mels, t + 1] (centred frames)
    return torch.log(mel[:, :t].T + LOG_FLOOR).numpy()


def _check_wav(i: int, w) -> np.ndarray:
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 1 or w.size == 0:
        raise CodecError(f"clip {i}: expected mono audio of shape [samples] at 24 kHz, got shape {w.shape}")
    if not np.isfinite(w).all():
        raise CodecError(f"clip {i}: contains NaN or infinite samples")
    return w


# ------------------------------------------------------------------------------------------------
# Fitting


def _nearest(x, centroids, centroid_norms):
    """Index of the nearest centroid for each row of x (squared L2; ||x||^2 is the same for all)."""
    return (centroid_norms[None, :] - 2.0 * (x @ centroids.T)).argmin(dim=1)


def _kmeans(x, k: int, iterations: int, gen):
    """Lloyd's k-means on ``x`` [N, D] (float32 torch) from ``k`` distinct seeded rows; deterministic."""
    import torch

    n = x.shape[0]
    centroids = x[torch.randperm(n, generator=gen)[:k]].clone()
    for _ in range(iterations):
        assign = _nearest(x, centroids, centroids.pow(2).sum(1))
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        alive = counts > 0
        centroids[alive] = sums[alive] / counts[alive, None].to(x.dtype)
        dead = (~alive).nonzero().flatten()
        if len(dead):
            # Re-seed unused centroids on the frames they would help most: those worst fitted now.
            err = (x - centroids[assign]).pow(2).sum(1)
            centroids[dead] = x[err.topk(len(dead)).indices]
    return centroids


def fit_tables(wavs: Iterable[np.ndarray], settings: MelRVQSettings, progress: bool = False) -> dict:
    """Fit the normalization and the residual codebooks on ``wavs`` (float32 mono at 24 kHz).

    At most ``settings.fit_frames`` frames (a seeded sample of all the clips' frames) are used, so the
    time and memory of the fit are bounded whatever the corpus size: ~N * 1024 * n_mels * 2 FLOPs per
    Lloyd iteration and stage, N x n_mels floats of memory.
    """
    import torch

    t0, cpu0 = time.perf_counter(), time.process_time()
    frames = [log_mel(_check_wav(i, w), settings.n_mels, settings.hop_length) for i, w in enumerate(wavs)]
    if not frames:
        raise CodecError("mel_rvq fit: no audio to fit on (the training split is empty)")
    x = torch.from_numpy(np.concatenate(frames))
    if x.shape[0] < CODEBOOK_SIZE:
        raise CodecError(
            f"mel_rvq fit: {x.shape[0]} frames of audio ({x.shape[0] / settings.frame_rate:.1f} s) are too few "
            f"to fit {CODEBOOK_SIZE} codes per stage; give the corpus at least "
            f"{CODEBOOK_SIZE / settings.frame_rate:.0f} s "
            "of training audio"
        )
    gen = torch.Generator().manual_seed(settings.seed)
    if x.shape[0] > settings.fit_frames:
        x = x[torch.randperm(x.shape[0], generator=gen)[: settings.fit_frames].sort().values]
    mean = x.mean(0)
    std = x.std(0).clamp_min(1e-3)
    residual = (x - mean) / std
    books = []
    for stage in range(settings.num_codebooks):
        book = _kmeans(residual, CODEBOOK_SIZE, settings.fit_iterations, gen)
        residual = residual - book[_nearest(residual, book, book.pow(2).sum(1))]
        books.append(book)
        if progress:
            log.info(
                "mel_rvq fit: stage %d/%d, residual energy %.3f per dimension",
                stage + 1,
                settings.num_codebooks,
                residual.pow(2).mean().item(),
            )
    log.info(
        "mel_rvq fit: %d frames (%.1f min of audio sampled from %d clips) in %.1f s (%.1f CPU-s)",
        x.shape[0],
        sum(len(f) for f in frames) / settings.frame_rate / 60,
        len(frames),
        time.perf_counter() - t0,
        time.process_time() - cpu0,
    )
    return {"mean": mean.numpy(), "std": std.numpy(), "codebooks": torch.stack(books).numpy()}


def tables_bytes(tables: dict, settings: MelRVQSettings) -> bytes:
    """The fitted file's bytes: plain arrays + settings as JSON text, an ``.npz`` (no pickles).

    Written entry by entry with a fixed timestamp (``np.savez`` stamps the current time into the zip),
    so the same tables always give the same bytes and the same sha256.
    """
    arrays = {
        "mean": np.asarray(tables["mean"], dtype=np.float32),
        "std": np.asarray(tables["std"], dtype=np.float32),
        "codebooks": np.asarray(tables["codebooks"], dtype=np.float32),
        "settings": np.array(
            json.dumps({**settings.to_dict(), "tables_version": TABLES_VERSION}, sort_keys=True)
        ),
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as z:
        for name, array in arrays.items():
            entry = io.BytesIO()
            np.lib.format.write_array(entry, array, allow_pickle=False)
            z.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), entry.getvalue())
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_tables(data: bytes, where: str, settings: MelRVQSettings) -> dict:
    """Arrays from a fitted file's bytes; raises :class:`CodecError` naming ``where`` if they do not
    hold the tables of ``settings``."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            tables = {k: z[k] for k in ("mean", "std", "codebooks", "settings")}
        stored = json.loads(str(tables.pop("settings")))
    except (OSError, ValueError, KeyError) as e:
        raise CodecError(f"{where}: not a vallex mel_rvq tables file ({type(e).__name__}: {e})") from None
    want = {**settings.to_dict(), "tables_version": TABLES_VERSION}
    if stored != want:
        diff = {k: (stored.get(k), v) for k, v in want.items() if stored.get(k) != v}
        raise CodecError(f"{where}: fitted for other settings (stored, wanted): {diff}")
    q, n = settings.num_codebooks, settings.n_mels
    shapes = {"mean": (n,), "std": (n,), "codebooks": (q, CODEBOOK_SIZE, n)}
    for key, shape in shapes.items():
        if tables[key].shape != shape or tables[key].dtype != np.float32:
            raise CodecError(f"{where}: {key} has shape {tables[key].shape}, expected {shape} float32")
    return tables


# ------------------------------------------------------------------------------------------------
# The tokenizer


class MelRVQTokenizer:
    """Encode/decode with fitted tables; the same interface as :class:`vallex.codec.encodec.AudioTokenizer`."""

    is_real_encodec = False
    sample_rate = SAMPLE_RATE

    def __init__(self, settings: MelRVQSettings, tables: dict):
        import torch

        self.settings = settings
        self.mean = torch.from_numpy(np.asarray(tables["mean"], dtype=np.float32))
        self.std = torch.from_numpy(np.asarray(tables["std"], dtype=np.float32))
        self.codebooks = torch.from_numpy(np.asarray(tables["codebooks"], dtype=np.float32))
        self._norms = self.codebooks.pow(2).sum(-1)  # [Q, 1024]

    @property
    def num_codebooks(self) -> int:
        return self.settings.num_codebooks

    def encode(self, wavs: list[np.ndarray]) -> list[np.ndarray]:
        """Mono float32 at 24 kHz -> int16 ``[num_codebooks, ceil(len / hop_length)]`` each (75 Hz: hop 320)."""
        import torch

        out = []
        for i, w in enumerate(wavs):
            wav = _check_wav(i, w)
            x = (
                torch.from_numpy(log_mel(wav, self.settings.n_mels, self.settings.hop_length)) - self.mean
            ) / self.std
            codes = torch.empty(self.num_codebooks, x.shape[0], dtype=torch.int16)
            with torch.inference_mode():
                for k in range(self.num_codebooks):
                    idx = _nearest(x, self.codebooks[k], self._norms[k])
                    codes[k] = idx.to(torch.int16)
                    x = x - self.codebooks[k][idx]
            out.append(np.ascontiguousarray(codes.numpy()))
        return out

    def code_vectors(self) -> np.ndarray:
        """Float32 ``[num_codebooks, 1024, n_mels]``: each code's centroid (normalized log-mel); a frame's
        features are the sum of its codes' vectors."""
        return self.codebooks.numpy().copy()

    def features(self, codes: np.ndarray):
        """Normalized log-mel frames ``[T, n_mels]`` the codes stand for (sum of their centroids)."""
        import torch

        c = torch.from_numpy(np.asarray(codes).astype(np.int64))
        return sum(self.codebooks[k][c[k]] for k in range(self.num_codebooks))

    def decode(self, codes: list[np.ndarray]) -> list[np.ndarray]:
        """int16 ``[num_codebooks, frames]`` -> float32 mono at 24 kHz, ``frames * hop_length`` samples each
        (mel inversion + Griffin-Lim with a fixed seed: the same codes give the same samples)."""
        import torch
        import torchaudio

        q = self.num_codebooks
        out = []
        hop = self.settings.hop_length
        mel = _Mel.get(self.settings.n_mels, hop)
        for i, c in enumerate(codes):
            c = np.asarray(c)
            if c.ndim != 2 or c.shape[0] != q or c.shape[1] == 0:
                raise CodecError(f"codes {i}: expected shape [{q}, frames>0], got {c.shape}")
            if c.min() < 0 or c.max() >= CODEBOOK_SIZE:
                raise CodecError(
                    f"codes {i}: values must be in [0, {CODEBOOK_SIZE}), got {c.min()}..{c.max()}"
                )
            t = c.shape[1]
            with torch.inference_mode():
                logmel = self.features(c) * self.std + self.mean  # [T, n_mels]
                power_mel = (logmel.exp() - LOG_FLOOR).clamp_min(0.0)
                linear = (power_mel @ mel.inverse).clamp_min(0.0).T  # [n_freqs, T]
                linear = torch.cat([linear, linear[:, -1:]], dim=1)  # T + 1 centred frames cover T * hop
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(0)  # Griffin-Lim starts from random phases
                    wav = torchaudio.transforms.GriffinLim(
                        n_fft=N_FFT,
                        hop_length=hop,
                        power=2.0,
                        n_iter=GRIFFIN_LIM_ITERS,
                        length=t * hop,
                    )(linear)
            peak = float(wav.abs().max())
            wav = wav * (0.9 / peak) if peak > 0.9 else wav
            out.append(np.ascontiguousarray(wav.numpy(), dtype=np.float32))
        return out
