"""Reading and resampling audio for the codec: any file libsndfile decodes (wav, flac, mp3, ogg) -> mono float32.

soundfile (libsndfile) rather than ``torchaudio.load``: torchaudio 2.11 hands decoding to torchcodec,
which is not installed here. Resampling uses ``torchaudio.functional.resample``, a pure-torch windowed
sinc filter that needs no decoder library.

Memory is bounded whatever the file:

- **Duration first.** :func:`audio_info` reads the header only; :func:`read_audio` with ``max_seconds``
  refuses a file whose header says it is longer (:class:`AudioTooLong`) without decoding it, and never
  decodes more than ``max_seconds`` (+1 frame) even when the header lies. Channels are mixed block by
  block, so a multichannel file never sits in memory whole.
- **Resampling.** torchaudio's filter bank has one phase per output sample of the reduced ratio
  ``sr_to/gcd : sr_from/gcd``: 80:147 for 44.1 kHz, but 24000:44101 for an off-grid 44 101 Hz, whose
  kernel (24000 x 44125 taps, float64 while built) takes ~8.5 GB. When either term exceeds
  ``MAX_RATIO_TERM`` the ratio is replaced by its closest fraction with both terms <= ``MAX_RATIO_TERM``
  (``fractions.Fraction.limit_denominator``): the kernel stays below ~1000 x 1100 taps for any pair of
  rates, and the timing error is the fraction's relative error: 2e-6 for 44 101 -> 24 000 Hz, at most
  5e-4 for any rate from 8 kHz to 192 kHz (8 004 Hz is read as 8 000 Hz: 0.9 cent of pitch, 0.05% of
  tempo, below what an ear or EnCodec resolves; checked over every integer rate). The output is
  padded or cut to the exact ``ceil(len * sr_to / sr_from)`` samples.

**Channels** are mixed to mono by a mean over the channels, leaving out a low-frequency-effects (LFE)
channel, which carries no speech and would add rumble. Where the LFE is, in this order of preference:
a WAVE_FORMAT_EXTENSIBLE header's channel mask (``SPEAKER_LOW_FREQUENCY``); else, for 6 (5.1) and 8
(7.1) channels, the format's standard order: Vorbis/Opus put it last (L C R Ls Rs LFE), WAV, FLAC and
the rest fourth (L R C LFE Ls Rs, the WAVE/SMPTE order). Other channel counts are averaged whole. Each
file's rule is returned as a short description (``DecodedAudio.mix``), which preparation counts per
language in its manifest.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8_000, 192_000  # what preparation accepts
MAX_RATIO_TERM = 1000  # largest term of the resampling ratio (bounds the filter bank, see above)
_SPEAKER_LOW_FREQUENCY = 0x8  # WAVE_FORMAT_EXTENSIBLE dwChannelMask bit of the LFE channel
_BLOCK_FRAMES = 1 << 16  # frames decoded at a time when mixing channels


class AudioError(ValueError):
    """An audio file cannot be used (missing, unreadable, corrupt, truncated or empty); names the file."""


# A WAV data chunk size of 0 or >= 2**31 - 1 is a placeholder written by streaming encoders (ffmpeg to a
# pipe, some recorders) that never came back to fill it in: such a file is not truncated.
_WAV_STREAMING_SIZES = (0, 0x7FFFFFFF, 0xFFFFFFFF)


def _wav_truncation(path: Path) -> str | None:
    """Why a RIFF/WAVE file is cut short, or None. libsndfile reads such a file without complaint
    (it just returns fewer frames), so a clip cut mid-write would otherwise go into training with
    the text of the whole utterance."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None  # RF64/W64/other: left to libsndfile
            offset = 12
            while offset + 8 <= size:
                f.seek(offset)
                chunk_id, chunk_size = struct.unpack("<4sI", f.read(8))
                if chunk_id == b"data":
                    available = size - offset - 8
                    if chunk_size not in _WAV_STREAMING_SIZES and available < chunk_size:
                        return f"its header declares {chunk_size} bytes of audio data but only {available} are there"
                    return None
                offset += 8 + chunk_size + (chunk_size & 1)  # chunks are word-aligned
    except OSError:
        return None  # unreadable: soundfile reports it below
    return None


class AudioTooLong(AudioError):
    """The file is longer than the caller's limit (known from its header or from a capped read)."""


@dataclass(frozen=True)
class AudioInfo:
    """What a file's header says (nothing decoded)."""

    frames: int
    sample_rate: int
    channels: int
    format: str  # libsndfile's major format (WAV, WAVEX, FLAC, OGG, MP3...)
    subtype: str  # and encoding (PCM_16, VORBIS, OPUS...)
    lfe: int | None  # index of the LFE channel, if any (see the module docstring)
    mix: str  # how read_audio mixes the channels to mono

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate > 0 else 0.0


@dataclass(frozen=True)
class DecodedAudio:
    samples: np.ndarray  # float32 mono
    sample_rate: int
    mix: str  # e.g. "mono", "mean of 2 channels", "mean of 5 of 6 channels, LFE (channel 4) left out (...)"


def _wav_channel_mask(path: Path) -> int | None:
    """dwChannelMask of a WAVE_FORMAT_EXTENSIBLE file (None if not one, or unreadable)."""
    try:
        with path.open("rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            for _ in range(64):  # the fmt chunk comes first in practice; never scan far
                chunk = f.read(8)
                if len(chunk) < 8:
                    return None
                chunk_id, size = struct.unpack("<4sI", chunk)
                if chunk_id == b"fmt ":
                    fmt = f.read(min(size, 64))
                    if len(fmt) >= 24 and struct.unpack_from("<H", fmt, 0)[0] == 0xFFFE:
                        return struct.unpack_from("<I", fmt, 20)[0]
                    return None
                f.seek(size + (size & 1), os.SEEK_CUR)
    except (OSError, struct.error):
        return None
    return None


def _lfe_channel(path: Path, fmt: str, subtype: str, channels: int) -> tuple[int | None, str]:
    """(index of the LFE channel or None, where that came from)."""
    if fmt in ("WAV", "WAVEX", "RF64", "W64"):
        mask = _wav_channel_mask(path)
        if mask:  # 0 means "no positions given": fall through to the standard order
            if not mask & _SPEAKER_LOW_FREQUENCY:
                return None, "WAVE channel mask"
            return bin(mask & (_SPEAKER_LOW_FREQUENCY - 1)).count("1"), "WAVE channel mask"
    if channels in (6, 8):
        if subtype in ("VORBIS", "OPUS"):
            return channels - 1, f"{subtype.title()} {'5.1' if channels == 6 else '7.1'} order"
        return 3, f"{'5.1' if channels == 6 else '7.1'} order L R C LFE"
    return None, ""


def _mix_rule(channels: int, lfe: int | None, source: str) -> tuple[np.ndarray, str]:
    """(per-channel weights, description) of the mono mix."""
    if channels == 1:
        return np.ones(1, np.float32), "mono"
    weights = np.full(channels, 1.0, np.float32)
    if lfe is None or not 0 <= lfe < channels:
        return weights / channels, f"mean of {channels} channels"
    weights[lfe] = 0.0
    return (
        weights / (channels - 1),
        f"mean of {channels - 1} of {channels} channels, LFE (channel {lfe + 1}) left out ({source})",
    )


def _decode_error(path: Path, e: Exception) -> AudioError:
    return AudioError(f"audio file {path} cannot be decoded ({e}); formats read here: wav, flac, mp3, ogg")


_SF_ERRORS = (RuntimeError, OSError, ValueError)  # soundfile.SoundFileError is a RuntimeError


def audio_info(path: str | os.PathLike) -> AudioInfo:
    """The file's header: frames, rate, channels, and how it would be mixed. Nothing is decoded."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise AudioError(f"audio file {path} does not exist")
    why = _wav_truncation(path)
    if why:
        raise AudioError(f"audio file {path} is truncated: {why}")
    try:
        info = sf.info(str(path))
    except _SF_ERRORS as e:
        raise _decode_error(path, e) from None
    if info.samplerate <= 0:
        raise AudioError(f"audio file {path} has an invalid sample rate {info.samplerate}")
    if info.channels <= 0:
        raise AudioError(f"audio file {path} has no channels")
    lfe, source = _lfe_channel(path, info.format, info.subtype, info.channels)
    _, mix = _mix_rule(info.channels, lfe, source)
    return AudioInfo(
        frames=max(int(info.frames), 0),
        sample_rate=int(info.samplerate),
        channels=int(info.channels),
        format=str(info.format),
        subtype=str(info.subtype),
        lfe=lfe,
        mix=mix,
    )


def read_audio(
    path: str | os.PathLike, *, max_seconds: float | None = None, info: AudioInfo | None = None
) -> DecodedAudio:
    """Decode ``path`` to float32 mono in [-1, 1], mixing channels as the module docstring says.

    With ``max_seconds``, a file longer than that is :class:`AudioTooLong`, known from its header
    without decoding, or from a read capped at ``max_seconds`` + 1 frame when the header says less.
    Raises :class:`AudioError` naming the file when it is missing, not decodable, truncated, has no
    samples, or holds NaN/inf.
    """
    import soundfile as sf

    path = Path(path)
    info = info or audio_info(path)
    sr = info.sample_rate
    cap = None if max_seconds is None else math.floor(max_seconds * sr) + 1
    if cap is not None and info.frames >= cap:
        raise AudioTooLong(
            f"audio file {path} lasts {info.duration:.1f} s (its header), over the limit of {max_seconds:g} s"
        )
    lfe, source = _lfe_channel(path, info.format, info.subtype, info.channels)
    weights, mix = _mix_rule(info.channels, lfe, source)
    want = cap if cap is not None else (info.frames if info.frames > 0 else None)
    parts: list[np.ndarray] = []
    decoded = 0
    try:
        with sf.SoundFile(str(path)) as f:
            while want is None or decoded < want:
                n = _BLOCK_FRAMES if want is None else min(_BLOCK_FRAMES, want - decoded)
                block = f.read(n, dtype="float32", always_2d=True)
                if len(block) == 0:
                    break
                parts.append(block[:, 0].copy() if info.channels == 1 else block @ weights)
                decoded += len(block)
    except _SF_ERRORS as e:
        raise _decode_error(path, e) from None
    if cap is not None and decoded >= cap:
        raise AudioTooLong(
            f"audio file {path} lasts over {max_seconds:g} s (its header said {info.duration:.1f} s)"
        )
    if info.frames > 0 and decoded < info.frames:
        raise AudioError(
            f"audio file {path} is corrupt or truncated: {decoded} of {info.frames} frames decoded"
        )
    if decoded == 0:
        raise AudioError(f"audio file {path} contains no samples")
    mono = np.concatenate(parts).astype(np.float32, copy=False)
    if not np.isfinite(mono).all():
        raise AudioError(f"audio file {path} contains NaN or infinite samples")
    return DecodedAudio(np.ascontiguousarray(mono), sr, mix)


def load_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """``(samples, sample_rate)``: float32 mono in [-1, 1] (see :func:`read_audio`, no length limit)."""
    audio = read_audio(path)
    return audio.samples, audio.sample_rate


def resample_ratio(sr_from: int, sr_to: int) -> tuple[int, int]:
    """``(up, down)``: the ratio ``sr_to / sr_from`` with both terms <= ``MAX_RATIO_TERM``, exact when
    its reduced form fits, else the closest fraction that does (see the module docstring)."""
    g = math.gcd(sr_from, sr_to)
    up, down = sr_to // g, sr_from // g
    if max(up, down) <= MAX_RATIO_TERM:
        return up, down
    if up <= down:
        f = Fraction(sr_to, sr_from).limit_denominator(MAX_RATIO_TERM)
        return max(f.numerator, 1), f.denominator
    f = Fraction(sr_from, sr_to).limit_denominator(MAX_RATIO_TERM)
    return f.denominator, max(f.numerator, 1)


def resample(wav: np.ndarray, sr_from: int, sr_to: int) -> np.ndarray:
    """Resample mono float32 audio in bounded memory; the result has ``ceil(len(wav) * sr_to / sr_from)``
    samples."""
    wav = np.ascontiguousarray(wav, dtype=np.float32)
    if wav.ndim != 1:
        raise ValueError(f"resample expects mono audio of shape [samples], got shape {wav.shape}")
    if sr_from <= 0 or sr_to <= 0:
        raise ValueError(f"sample rates must be positive, got {sr_from} -> {sr_to}")
    if sr_from == sr_to:
        return wav
    import torch
    import torchaudio.functional as taf

    up, down = resample_ratio(int(sr_from), int(sr_to))
    with torch.inference_mode():
        out = taf.resample(torch.from_numpy(wav), down, up).numpy().astype(np.float32, copy=False)
    n = -(-len(wav) * sr_to // sr_from)  # ceil, in integers
    if len(out) < n:  # an approximated ratio can land a sample or so short
        out = np.concatenate([out, np.zeros(n - len(out), np.float32)])
    return out[:n]
