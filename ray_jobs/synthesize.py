"""Synthesize speech with a trained VALL-E X model: text -> phonemes -> AR + NAR codes -> EnCodec -> wav.

    python ray_jobs/synthesize.py --checkpoint runs/x/model.vallex.pt --symbols runs/x/prepare/symbols.json \\
        --language en --text "Hello there." --text "A second sentence." --out runs/x/synth
    # cross-lingual: a French voice prompt (audio + its transcript) speaking English
    python ray_jobs/synthesize.py ... --language en --text "Hello." \\
        --prompt-audio prompt.wav --prompt-text "Bonjour à tous." --prompt-language fr --out runs/x/synth

Writes <out>/000.wav, 001.wav, ... (24 kHz mono, one per --text, in order) and <out>/synthesis.json saying
which checkpoint (path, sha256), symbol table, languages, codec and sampling settings made them, and each
file's text, phonemes and length. Runs in this process (CPU, or the GPU when there is one); no Ray cluster.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SIDECAR = "synthesis.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="synthesize.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="vallex checkpoint file, or a training run's model.pt (its report.json beside it)",
    )
    p.add_argument("--symbols", required=True, help="symbols.json of the data the model was trained on")
    p.add_argument("--text", action="append", required=True, help="text to say; repeat for several files")
    p.add_argument("--language", required=True, help="language of --text (one of the checkpoint's languages)")
    p.add_argument(
        "--prompt-audio", help="wav of the voice to imitate (any sample rate, resampled to 24 kHz)"
    )
    p.add_argument("--prompt-text", help="transcript of --prompt-audio (required with it)")
    p.add_argument("--prompt-language", help="language of the prompt (default: --language)")
    p.add_argument("--out", required=True, help="output folder for the wav files and synthesis.json")
    p.add_argument("--top-k", type=int, default=0, help="AR top-k (0 = no filtering; 1 = greedy) [0]")
    p.add_argument("--top-p", type=float, default=1.0, help="AR nucleus mass (1.0 = off) [1.0]")
    p.add_argument("--temperature", type=float, default=1.0, help="AR softmax temperature [1.0]")
    p.add_argument("--seed", type=int, default=0, help="sampling seed: same seed, same output [0]")
    p.add_argument("--max-frames", type=int, help="new frames per text at most [16 per phoneme]")
    codec = p.add_argument_group("codec (EnCodec 24 kHz, 6 kbps, unless --prepared-dir names another)")
    codec.add_argument(
        "--prepared-dir",
        help="prepared corpus the model was trained on: decode (and encode the prompt) with the codec that "
        "made its codes (its manifest.json; a fitted mel_rvq codec is read from there). Overrides the options below",
    )
    codec.add_argument("--codec-checkpoint", help="encodec_24khz-d7cc33bc.th [torch hub cache]")
    codec.add_argument(
        "--codec-random-init",
        action="store_true",
        help="seeded random-init codec instead of pretrained weights (tests/offline demo; noise, not speech)",
    )
    codec.add_argument("--codec-seed", type=int, default=0, help="seed of the random-init codec [0]")
    p.add_argument("--device", help="cpu or cuda [cuda when available]")
    args = p.parse_args(argv)
    if args.prompt_audio and not args.prompt_text:
        p.error("--prompt-audio needs --prompt-text (its transcript): the model reads prompt phonemes + text")
    if args.prompt_text and not args.prompt_audio:
        p.error("--prompt-text needs --prompt-audio")
    return args


def _say(message: str) -> None:
    """A progress line on stderr (stdout lists the files written): each phase can take seconds to minutes."""
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _say("loading torch")
    import numpy as np
    import soundfile as sf
    import torch

    from vallex.codec import open_tokenizer
    from vallex.codec.audio import load_audio, resample
    from vallex.codec.encodec import SAMPLE_RATE, CodecSettings
    from vallex.model.checkpoint import load_any
    from vallex.model.synthesis import SamplingSettings, language_id, synthesize_codes
    from vallex.text.phonemize import Phonemizer
    from vallex.text.symbols import SymbolTable

    t0 = time.time()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = SamplingSettings(args.top_k, args.top_p, args.temperature, args.seed, args.max_frames)
    table = SymbolTable.load(args.symbols)
    _say(f"loading {args.checkpoint} on {device}")
    model, meta = load_any(args.checkpoint, symbols=table.symbols)
    model.to(device).eval()
    languages = meta["languages"]
    lang = language_id(languages, args.language)
    prompt_language = args.prompt_language or args.language
    if args.prepared_dir:
        from vallex.data.corpus import PreparedCorpus

        codec_dict = PreparedCorpus.open(args.prepared_dir).codec
    else:
        codec_dict = CodecSettings(
            pretrained=not args.codec_random_init, checkpoint=args.codec_checkpoint, seed=args.codec_seed
        ).to_dict()
    codec = open_tokenizer(codec_dict, args.prepared_dir, device=device)

    phonemizer = Phonemizer()
    phones = phonemizer(args.text, args.language)
    ids = [table.encode(p, allow_unknown=True) for p in phones]
    prompt_ids, prompt_codes = [], None
    if args.prompt_audio:
        wav, sr = load_audio(args.prompt_audio)
        prompt_codes = codec.encode([resample(wav, sr, SAMPLE_RATE)])[0]
        prompt_ids = table.encode(phonemizer([args.prompt_text], prompt_language)[0], allow_unknown=True)
    _say(f"synthesizing {len(ids)} text(s) in {args.language} (up to {args.max_frames} frames each)")
    codes = synthesize_codes(
        model,
        ids,
        lang,
        settings,
        prompt_ids=prompt_ids,
        prompt_codes=prompt_codes,
        prompt_language=language_id(languages, prompt_language) if args.prompt_audio else None,
    )
    _say("decoding the codes to audio with EnCodec")
    wavs = codec.decode(codes)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, (text, ph, c, w) in enumerate(zip(args.text, phones, codes, wavs, strict=True)):
        name = f"{i:03d}.wav"
        sf.write(out / name, np.clip(w, -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16")
        unknown = sorted({s for s in ph if s not in table})
        files.append(
            {
                "file": name,
                "text": text,
                "phonemes": ph,
                "unknown_phonemes": unknown,
                "frames": int(c.shape[1]),
                "seconds": len(w) / SAMPLE_RATE,
            }
        )
    sidecar = {
        "checkpoint": {
            "path": str(Path(args.checkpoint).resolve()),
            "sha256": hashlib.sha256(Path(args.checkpoint).read_bytes()).hexdigest(),
            "size": meta["size"],
            "languages": languages,
            "symbols_version": meta["symbols"]["version"],
            "symbols_fingerprint": meta["symbols"]["fingerprint"],
        },
        "symbols": {
            "path": str(Path(args.symbols).resolve()),
            "version": table.version,
            "fingerprint": table.fingerprint,
        },
        "language": args.language,
        "prompt": (
            {
                "audio": str(Path(args.prompt_audio).resolve()),
                "text": args.prompt_text,
                "language": prompt_language,
                "frames": int(prompt_codes.shape[1]),
            }
            if args.prompt_audio
            else None
        ),
        "sampling": settings.to_dict(),
        "codec": codec_dict,
        "device": device,
        "files": files,
        "wall_seconds": time.time() - t0,
    }
    (out / SIDECAR).write_text(json.dumps(sidecar, indent=1, ensure_ascii=False))
    for f in files:
        print(f"{out / f['file']}  {f['seconds']:.2f} s  {f['text']!r}")
    if not codec.is_real_encodec:
        from vallex.codec.tokenizer import codec_summary

        print(f"note: {codec_summary(codec_dict)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
