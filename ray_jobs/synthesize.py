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
import sys
from pathlib import Path

from vallex.model.speech import say


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    say("loading torch")
    from vallex.model.speech import SpeechRequest, text_to_speech
    from vallex.model.synthesis import SamplingSettings

    request = SpeechRequest(
        checkpoint=args.checkpoint,
        symbols=args.symbols,
        texts=args.text,
        language=args.language,
        out=args.out,
        prompt_audio=args.prompt_audio,
        prompt_text=args.prompt_text,
        prompt_language=args.prompt_language,
        sampling=SamplingSettings(args.top_k, args.top_p, args.temperature, args.seed, args.max_frames),
        prepared_dir=args.prepared_dir,
        codec_checkpoint=args.codec_checkpoint,
        codec_random_init=args.codec_random_init,
        codec_seed=args.codec_seed,
        device=args.device,
    )
    sidecar, note = text_to_speech(request)
    for f in sidecar["files"]:
        print(f"{Path(args.out) / f['file']}  {f['seconds']:.2f} s  {f['text']!r}")
    if note:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
