"""Benchmark data preparation: audio-seconds per second of the Ray Data job vs a single-process loop.

    python bench/prepare.py                      # 96 demo utterances, 2 codec actors, 2 rounds
    python bench/prepare.py --utterances 200 --actors 4 --rounds 3

Both sides get the same files and the same codec (EnCodec 24 kHz, 6 kbps, seeded random init: the
pretrained weights cannot be downloaded offline; the network and the FLOPs are the same):

- **single process**: one Python loop, no Ray: load -> resample to 24 kHz -> encode (batches of
  ``codec_batch_size``, clips sorted by length like the actors do) -> collect the codes. PyTorch uses
  its default intra-op threads (every core), which is what a user running a plain script gets.
- **Ray Data job** (now Ray tasks and an actor pool, the name kept for the figures on record):
  ``vallex.data.prepare.prepare_corpus`` end to end into a fresh folder: the phonemize and plan
  tasks, the actor pool start-up (one EnCodec per actor, ``num_cpus=1`` each, so Ray pins
  each actor to one intra-op thread), decoding, filtering, encoding and writing Parquet shards, and the
  manifest. The Ray cluster itself is started before the clock starts (a cluster is up before a job).

The single-process loop also runs with one intra-op thread: on a busy machine PyTorch's default
threads can be slower than one (they spin while other processes hold the cores), and the headline
ratio is taken against the faster of the two settings. Rounds alternate the sides so drifting machine
load hits all of them; the best round of each is reported, with every round listed.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path


def single_process(utts, codec_batch_size: int, seed: int, threads: int | None = None) -> tuple[float, float]:
    """(audio seconds, wall seconds) for a plain loop over ``utts`` with one EnCodec in this process;
    ``threads`` caps PyTorch's intra-op threads (None: its default, every core)."""
    import torch

    from vallex.codec.audio import load_audio, resample
    from vallex.codec.encodec import SAMPLE_RATE, AudioTokenizer, CodecSettings

    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads)
    try:
        t0 = time.perf_counter()
        tokenizer = AudioTokenizer(CodecSettings(pretrained=False, seed=seed))
        clips, seconds = [], 0.0
        for u in utts:
            wav, sr = load_audio(u.audio)
            seconds += len(wav) / sr
            clips.append(resample(wav, sr, SAMPLE_RATE))
        clips.sort(key=len)
        codes = []
        for i in range(0, len(clips), codec_batch_size):
            codes.extend(tokenizer.encode(clips[i : i + codec_batch_size]))
        assert len(codes) == len(utts)
        return seconds, time.perf_counter() - t0
    finally:
        torch.set_num_threads(default_threads)


def ray_job(utts, actors: int, codec_batch_size: int, seed: int) -> tuple[float, float]:
    """(audio seconds kept, wall seconds) for prepare_corpus on ``utts`` into a fresh folder."""
    from vallex.config import CodecSection, PrepareSection
    from vallex.data.prepare import prepare_corpus

    settings = PrepareSection(
        codec=CodecSection(pretrained=False),
        codec_actors=actors,
        codec_batch_size=codec_batch_size,
        # 4 shard jobs per actor: the pool stays busy and its tail is short
        rows_per_shard=max(1, math.ceil(len(utts) / (4 * actors))),
    )
    out = Path(tempfile.mkdtemp(prefix="vallex-bench-prepare-"))
    try:
        t0 = time.perf_counter()
        manifest = prepare_corpus(utts, out, settings, seed=seed, progress=False)
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(out, ignore_errors=True)
    seconds = sum(e["hours"] for e in manifest["languages"].values()) * 3600
    return seconds, wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--utterances", type=int, default=96, help="demo utterances to use (spread over languages)"
    )
    ap.add_argument("--actors", type=int, default=2, help="codec actors of the Ray Data job")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of both sides")
    ap.add_argument("--codec-batch-size", type=int, default=8)
    ap.add_argument("--corpus", default="runs/demo/corpus", help="where the demo corpus is (or is made)")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all)")
    args = ap.parse_args(argv)
    from vallex.logs import setup_logging

    setup_logging(level=logging.WARNING)  # the figures below only; Ray's chatter is dropped

    from vallex.data.demo_corpus import make_demo_corpus
    from vallex.data.sources import Utterance, read_manifest
    from vallex.runtime import init_ray

    manifest = make_demo_corpus(args.corpus, seed=0, progress=False)
    every = read_manifest(manifest)
    by_lang: dict[str, list] = {}
    for u in every:
        by_lang.setdefault(u.language, []).append(u)
    per_lang = math.ceil(args.utterances / len(by_lang))  # the same number from each language
    utts = []
    for rows in by_lang.values():
        picked = rows[:: max(1, len(rows) // per_lang)][:per_lang]  # spread over speakers and sentences
        # Every 4th utterance is validation data, so each language has both splits.
        utts += [
            Utterance(**{**u.to_dict(), "split": "valid" if i % 4 == 3 else "train"})
            for i, u in enumerate(picked)
        ]
    langs = sorted({u.language for u in utts})
    init_ray(num_cpus=args.num_cpus)
    import ray
    import torch

    cpus = int(ray.cluster_resources().get("CPU", 0))
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} intra-op threads), Ray cluster {cpus} CPU; load {os.getloadavg()[0]:.2f}"
    )
    print(f"corpus: {len(utts)} utterances ({', '.join(langs)}), {args.actors} codec actor(s)")

    single, one_thread, job = [], [], []
    for r in range(args.rounds):
        s_sec, s_wall = single_process(utts, args.codec_batch_size, seed=0)
        single.append(s_sec / s_wall)
        t_sec, t_wall = single_process(utts, args.codec_batch_size, seed=0, threads=1)
        one_thread.append(t_sec / t_wall)
        j_sec, j_wall = ray_job(utts, args.actors, args.codec_batch_size, seed=0)
        job.append(j_sec / j_wall)
        print(
            f"round {r + 1}: single process {s_sec:.0f} audio-s in {s_wall:.1f} s = {single[-1]:.1f} audio-s/s "
            f"(1 thread: {one_thread[-1]:.1f}) | "
            f"Ray Data job {j_sec:.0f} audio-s in {j_wall:.1f} s = {job[-1]:.1f} audio-s/s | "
            f"load {os.getloadavg()[0]:.2f}"
        )
    best_s, best_t, best_j = max(single), max(one_thread), max(job)
    base = max(best_s, best_t)  # the faster single-process setting: the conservative baseline
    print(
        f"best: single process {best_s:.1f} audio-s/s ({best_t:.1f} with 1 thread), "
        f"Ray Data job ({args.actors} actors) {best_j:.1f} audio-s/s, "
        f"ratio {best_j / base:.2f}x vs the faster single-process setting "
        f"({best_j / best_s:.2f}x vs default threads, {best_j / best_t:.2f}x vs 1 thread)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
