"""Reading and resampling audio for the codec: any file libsndfile decodes (wav, flac, mp3, ogg) -> mono float32.

soundfile (libsndfile) rather than ``torchaudio.load``: torchaudio 2.11 hands decoding to torchcodec,
which is not installed here. Resampling uses ``torchaudio.functional.resample``, a pure-torch windowed
sinc filter that needs no decoder library.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np


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


def load_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """``(samples, sample_rate)``: float32 mono in [-1, 1] (channels averaged).

    Raises :class:`AudioError` naming the file when it is missing, not decodable, truncated, has no
    samples, or holds NaN/inf.
    """
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise AudioError(f"audio file {path} does not exist")
    why = _wav_truncation(path)
    if why:
        raise AudioError(f"audio file {path} is truncated: {why}")
    try:
        info = sf.info(str(path))
        data, sample_rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, OSError, ValueError) as e:
        raise AudioError(
            f"audio file {path} cannot be decoded ({e}); formats read here: wav, flac, mp3, ogg"
        ) from None
    if info.frames > 0 and len(data) < info.frames:
        raise AudioError(
            f"audio file {path} is corrupt or truncated: {len(data)} of {info.frames} frames decoded"
        )
    if len(data) == 0:
        raise AudioError(f"audio file {path} contains no samples")
    if sample_rate <= 0:
        raise AudioError(f"audio file {path} has an invalid sample rate {sample_rate}")
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(mono).all():
        raise AudioError(f"audio file {path} contains NaN or infinite samples")
    return np.ascontiguousarray(mono, dtype=np.float32), int(sample_rate)


def resample(wav: np.ndarray, sr_from: int, sr_to: int) -> np.ndarray:
    """Resample mono float32 audio; the result has ``ceil(len(wav) * sr_to / sr_from)`` samples."""
    wav = np.ascontiguousarray(wav, dtype=np.float32)
    if wav.ndim != 1:
        raise ValueError(f"resample expects mono audio of shape [samples], got shape {wav.shape}")
    if sr_from <= 0 or sr_to <= 0:
        raise ValueError(f"sample rates must be positive, got {sr_from} -> {sr_to}")
    if sr_from == sr_to:
        return wav
    import torch
    import torchaudio.functional as taf

    with torch.inference_mode():
        out = taf.resample(torch.from_numpy(wav), int(sr_from), int(sr_to))
    return out.numpy().astype(np.float32, copy=False)
