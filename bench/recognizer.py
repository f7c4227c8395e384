"""The phoneme recognizer on a prepared corpus: PER per language against training time, per encoder.

    .venv/bin/python bench/recognizer.py runs/demo/prepare
    .venv/bin/python bench/recognizer.py runs/demo/prepare --steps 1500 --eval-every 250 --encoders lstm

One command, the same corpus, seed and batches for every encoder (the first is the baseline):
each trains for ``--steps`` on ``--threads`` torch threads, scoring every language's validation split
every ``--eval-every`` steps. Printed per evaluation: training seconds (evaluation time excluded), CPU
seconds of this process, and PER per language; then each encoder's seconds per step as a ratio to the
baseline's. On a shared machine wall time is inflated by other load: the CPU seconds say what the
training itself cost.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from vallex.data.corpus import PreparedCorpus
from vallex.eval.recognizer import train_recognizer


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("prepared", help="a prepared corpus folder (ray_jobs/prepare.py output)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--encoders", default="lstm,transformer")
    parser.add_argument("--layers", default="2,4", help="encoder layers, one per encoder")
    parser.add_argument("--alpha", type=float, default=0.5, help="language share ~ n ** alpha")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the curves here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    corpus = PreparedCorpus.open(args.prepared)
    print(f"corpus {corpus.root}: codec {corpus.codec}")
    print(f"train {corpus.counts('train')}  valid {corpus.counts('valid')}")
    results = {}
    for encoder, layers in zip(args.encoders.split(","), args.layers.split(","), strict=True):
        cpu0 = time.process_time()
        rec = train_recognizer(
            corpus,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            dim=args.dim,
            hidden=args.hidden,
            encoder=encoder,
            layers=int(layers),
            alpha=args.alpha,
            threads=args.threads,
            log_every=args.eval_every,
            eval_every=args.eval_every,
        )
        cpu = time.process_time() - cpu0
        params = sum(p.numel() for p in rec.net.parameters())
        results[encoder] = {"curve": rec.meta["curve"], "cpu_seconds": round(cpu, 1), "params": params}
        print(f"\n{encoder}: {params / 1e6:.2f} M parameters, {cpu:.0f} CPU s in all (evaluations included)")
        langs = sorted(rec.meta["valid_per"])
        print(f"{'step':>6}{'train s':>9}" + "".join(f"{lang:>8}" for lang in langs))
        for point in rec.meta["curve"]:
            pers = "".join(f"{100 * point['valid_per'][lang]:>7.1f}%" for lang in langs)
            print(f"{point['step']:>6}{point['seconds']:>9.1f}{pers}")
    base = results[args.encoders.split(",")[0]]["curve"][-1]["seconds"]
    print("\nseconds per step, ratio to the first encoder:")
    for encoder, r in results.items():
        last = r["curve"][-1]
        print(f"  {encoder:<12}{last['seconds'] / last['step']:.3f} s/step  {last['seconds'] / base:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
