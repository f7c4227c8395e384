"""Text to wav files with a trained checkpoint: the recipe behind ``ray_jobs/synthesize.py``.

text -> phonemes (vallex.text) -> ids in the checkpoint's symbol table -> AR + NAR codes
(vallex.model.synthesis) -> audio with the codec that made the training codes (vallex.codec) -> wav files
and ``synthesis.json`` saying which checkpoint, symbols, codec and sampling made them. One process
(CPU, or the GPU when there is one); no Ray.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vallex.files import write_text

SIDECAR = "synthesis.json"


def say(message: str) -> None:
    """A progress line on stderr (stdout is for the files written): each phase can take seconds to minutes."""
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


@dataclass
class SpeechRequest:
    """What to say, with which model and voice, and where to write it."""

    checkpoint: str
    """vallex checkpoint file, or a training run's model.pt."""
    symbols: str
    """symbols.json of the data the model was trained on."""
    texts: list[str]
    language: str
    out: str
    """Output folder: 000.wav, 001.wav, ... and synthesis.json."""
    prompt_audio: str | None = None
    prompt_text: str | None = None
    prompt_language: str | None = None
    sampling: Any = None
    """A :class:`vallex.model.synthesis.SamplingSettings` (None: its defaults)."""
    prepared_dir: str | None = None
    """The prepared corpus whose codec made the training codes (overrides the codec options below)."""
    codec_checkpoint: str | None = None
    codec_random_init: bool = False
    codec_seed: int = 0
    device: str | None = None


def _codec(request: SpeechRequest, device: str):
    """(codec settings dict, tokenizer): the prepared corpus's codec, else EnCodec as the options say."""
    from vallex.codec import open_tokenizer
    from vallex.codec.encodec import CodecSettings

    if request.prepared_dir:
        from vallex.data.corpus import PreparedCorpus

        codec_dict = PreparedCorpus.open(request.prepared_dir).codec
    else:
        codec_dict = CodecSettings(
            pretrained=not request.codec_random_init,
            checkpoint=request.codec_checkpoint,
            seed=request.codec_seed,
        ).to_dict()
    return codec_dict, open_tokenizer(codec_dict, request.prepared_dir, device=device)


def text_to_speech(request: SpeechRequest, progress: Callable[[str], None] = say) -> tuple[dict, str | None]:
    """Synthesize ``request.texts``; writes the wav files and synthesis.json. Returns the sidecar dict and,
    when the codec is not pretrained EnCodec, a note saying what it is (its audio is not real speech)."""
    import torch

    from vallex.codec.audio import load_audio, resample
    from vallex.codec.encodec import SAMPLE_RATE
    from vallex.codec.tokenizer import codec_summary
    from vallex.model.checkpoint import load_any
    from vallex.model.synthesis import SamplingSettings, language_id, synthesize_codes
    from vallex.text.phonemize import Phonemizer
    from vallex.text.symbols import SymbolTable

    t0 = time.time()
    sampling = request.sampling or SamplingSettings()
    device = request.device or ("cuda" if torch.cuda.is_available() else "cpu")
    table = SymbolTable.load(request.symbols)
    progress(f"loading {request.checkpoint} on {device}")
    model, meta = load_any(request.checkpoint, symbols=table.symbols)
    model.to(device).eval()
    languages = meta["languages"]
    lang = language_id(languages, request.language)
    prompt_language = request.prompt_language or request.language
    codec_dict, codec = _codec(request, device)

    phonemizer = Phonemizer()
    phones = phonemizer(request.texts, request.language)
    ids = [table.encode(p, allow_unknown=True) for p in phones]
    prompt_ids, prompt_codes = [], None
    if request.prompt_audio:
        wav, sr = load_audio(request.prompt_audio)
        prompt_codes = codec.encode([resample(wav, sr, SAMPLE_RATE)])[0]
        prompt_ids = table.encode(phonemizer([request.prompt_text], prompt_language)[0], allow_unknown=True)
    progress(
        f"synthesizing {len(ids)} text(s) in {request.language} (up to {sampling.max_frames} frames each)"
    )
    codes = synthesize_codes(
        model,
        ids,
        lang,
        sampling,
        prompt_ids=prompt_ids,
        prompt_codes=prompt_codes,
        prompt_language=language_id(languages, prompt_language) if request.prompt_audio else None,
    )
    progress("decoding the codes to audio with EnCodec")
    files = _write_wavs(Path(request.out), request.texts, phones, codes, codec.decode(codes), table)
    sidecar = {
        "checkpoint": {
            "path": str(Path(request.checkpoint).resolve()),
            "sha256": hashlib.sha256(Path(request.checkpoint).read_bytes()).hexdigest(),
            "size": meta["size"],
            "languages": languages,
            "symbols_version": meta["symbols"]["version"],
            "symbols_fingerprint": meta["symbols"]["fingerprint"],
        },
        "symbols": {
            "path": str(Path(request.symbols).resolve()),
            "version": table.version,
            "fingerprint": table.fingerprint,
        },
        "language": request.language,
        "prompt": (
            {
                "audio": str(Path(request.prompt_audio).resolve()),
                "text": request.prompt_text,
                "language": prompt_language,
                "frames": int(prompt_codes.shape[1]),
            }
            if request.prompt_audio
            else None
        ),
        "sampling": sampling.to_dict(),
        "codec": codec_dict,
        "device": device,
        "files": files,
        "wall_seconds": time.time() - t0,
    }
    write_text(Path(request.out) / SIDECAR, json.dumps(sidecar, indent=1, ensure_ascii=False))
    return sidecar, None if codec.is_real_encodec else codec_summary(codec_dict)


def _write_wavs(out: Path, texts, phones, codes, wavs, table) -> list[dict]:
    """One 16-bit wav per text, in order; what synthesis.json says of each."""
    import numpy as np
    import soundfile as sf

    from vallex.codec.encodec import SAMPLE_RATE

    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, (text, ph, c, w) in enumerate(zip(texts, phones, codes, wavs, strict=True)):
        name = f"{i:03d}.wav"
        sf.write(out / name, np.clip(w, -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16")
        files.append(
            {
                "file": name,
                "text": text,
                "phonemes": ph,
                "unknown_phonemes": sorted({s for s in ph if s not in table}),
                "frames": int(c.shape[1]),
                "seconds": len(w) / SAMPLE_RATE,
            }
        )
    return files
