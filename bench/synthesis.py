"""Synthesis throughput: batched AR decoding against one text at a time, same model and texts, one run.

    .venv/bin/python bench/synthesis.py                    # small model, 8 texts, 150 frames each
    .venv/bin/python bench/synthesis.py --size tiny --texts 16 --frames 100 --threads 2

Both decode greedily (top_k=1) with a KV cache and the NAR after; every text is held to exactly
``--frames`` frames (min_frames = max_frames) so both do the same work. Prints generated frames/s for
each and the ratio batched / one-at-a-time, and checks the codes are identical.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", help="named model size (tiny, small, paper)")
    ap.add_argument("--texts", type=int, default=8, help="texts synthesized together")
    ap.add_argument("--frames", type=int, default=150, help="frames per text (75 = 1 s of audio)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from vallex.model.vallex import build_model

    torch.manual_seed(0)
    model = build_model(args.size, num_phonemes=128, num_languages=4).eval()
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(20, 60, (args.texts,), generator=g)
    phonemes = torch.randint(4, 128, (args.texts, int(lens.max())), generator=g)
    phonemes[torch.arange(phonemes.shape[1])[None] >= lens[:, None]] = 0
    language = torch.randint(0, 4, (args.texts,), generator=g)
    common = dict(top_k=1, max_frames=args.frames, min_frames=args.frames)

    results, seconds = {}, {}
    with torch.inference_mode():
        model.generate(phonemes[:1], lens[:1], language[:1], top_k=1, max_frames=5)  # warm-up
        for batched in (False, True):
            t0 = time.perf_counter()
            results[batched] = model.generate(phonemes, lens, language, **common, batched=batched)
            seconds[batched] = time.perf_counter() - t0
    same = all(torch.equal(a, b) for a, b in zip(results[False], results[True], strict=True))
    total = args.texts * args.frames
    one, many = total / seconds[False], total / seconds[True]
    print(f"model {args.size}, {args.texts} texts x {args.frames} frames, {args.threads} threads")
    print(f"one at a time: {one:8.1f} frames/s ({seconds[False]:.2f} s)")
    print(f"batched:       {many:8.1f} frames/s ({seconds[True]:.2f} s)")
    print(f"ratio batched / one at a time: {many / one:.2f}x; identical codes: {same}")


if __name__ == "__main__":
    main()
