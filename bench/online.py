"""Online language weights against static ones on the known-answer synthetic task, at equal compute.

    /work/main/.venv/bin/python bench/online.py                 # 400 rows, 50 stretches of 8, 8 seeds
    /work/main/.venv/bin/python bench/online.py --stretches 10  # fewer evaluations: 10 stretches of 40

The task is tests/tune/test_search.py's known answer: en / fr / zh whose codes are uniform over 16 / 64 / 256
values (easy to hard), 3000 / 1200 / 500 train rows, 10 frames x 8 codebooks per row. The learner is
the add-1/2 (Krichevsky-Trofimov) estimate of each language's code distribution from the rows it was
given, scored on 50 validation rows per language: its loss minus the loss of the *solo* run (the whole
budget on that one language) is the excess that Tune's ``normalized_max`` objective compares. Theory
puts the static weights that minimize the worst excess at about en .088, fr .289, zh .622.

Every run draws its rows through the path training uses with data.weights=online
(``vallex.data.mixing.Stretches`` -> ``rank_rows`` -> ``numpy_batches``, one rank, batches of 8): a
static run is that path with weights that never change; an online run updates
``vallex.data.online.OnlineWeights`` at the end of each stretch from the learner's validation losses,
with the solo losses as reference (what ``data.online.reference=<Tune best_weights.json>`` gives) and
uniform as the prior. Every run draws exactly ``--budget`` rows (equal compute). Each online run is followed
by a static run at the weights it ended with (what ``online_weights.json`` hands to ``data.weights``: two
runs in all). Printed per weighting: the worst excess at the end (mean over seeds, and relative to the theory's static minimax weights), each
language's excess, and the rows each language got. The learner is counted, not trained: it says what the
*weights* do, not what a transformer does with them.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import numpy as np

from vallex.data.corpus import PreparedCorpus
from vallex.data.mixing import MixPlan, Stretches, numpy_batches, rank_rows
from vallex.data.online import OnlineSettings, OnlineWeights
from vallex.data.synthetic import write_synthetic_corpus
from vallex.data.weights import resolve_weights

K = {"en": 16, "fr": 64, "zh": 256}
SIZES = {"en": 3000, "fr": 1200, "zh": 500}
FRAMES, CODEBOOKS, BATCH, CODES = 10, 8, 8, 1024


def minimax_weights() -> dict[str, float]:
    """Static weights equalizing the excess (K-1)(1/w - 1)/(2BT) over the solo run: w ~ (K-1)/(t+K-1)."""
    lo, hi = 1e-6, 1e6
    for _ in range(200):
        t = math.sqrt(lo * hi)
        lo, hi = (t, hi) if sum((k - 1) / (t + k - 1) for k in K.values()) > 1 else (lo, t)
    return {lang: (k - 1) / (t + k - 1) for lang, k in K.items()}


class Learner:
    """Per-language code counts of the rows seen; the add-1/2 validation cross-entropy over the codes
    the language uses."""

    def __init__(self, alphabet: dict[str, np.ndarray], valid: dict[str, np.ndarray]):
        self.alphabet, self.valid = alphabet, valid
        self.counts = {lang: np.zeros(CODES, dtype=np.int64) for lang in alphabet}
        self.rows = dict.fromkeys(alphabet, 0)

    def see(self, batch: dict) -> None:
        for lang, codes in zip(batch["language"].tolist(), batch["codes"], strict=True):
            self.counts[lang] += np.bincount(np.asarray(codes, dtype=np.int64), minlength=CODES)
            self.rows[lang] += 1

    def losses(self) -> dict[str, float]:
        out = {}
        for lang, a in self.alphabet.items():
            q = np.where(a, self.counts[lang] + 0.5, 0.0)
            q /= q.sum()
            v = self.valid[lang]
            out[lang] = float(-(v[a] * np.log(q[a])).sum() / v.sum())
        return out


def code_counts(corpus: PreparedCorpus, lang: str, split: str) -> np.ndarray:
    codes = corpus.read_split(lang, split, columns=["codes", "split"])["codes"]
    flat = np.concatenate([np.asarray(c, dtype=np.int64) for c in codes.to_pylist()])
    return np.bincount(flat, minlength=CODES)


def run(base: MixPlan, learner: Learner, budget: int, stretches: int, weights=None, online=None) -> dict:
    """Draw ``budget`` rows in ``stretches`` stretches at fixed ``weights`` or at ``online``'s."""
    mix = Stretches(base)
    per = budget // stretches
    for _ in range(stretches):
        w = online.weights if online is not None else weights
        plan = mix.plan(w, per)
        for batch in numpy_batches(rank_rows(plan, 0, 1, BATCH), BATCH):
            learner.see(batch)
        mix.advance(plan)
        if online is not None:
            online.update(mix.index, learner.losses())
    return {"losses": learner.losses(), "rows": dict(learner.rows)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=int, default=400, help="rows every run draws (equal compute)")
    p.add_argument("--stretches", type=int, default=50, help="evaluations per run (online: weight updates)")
    p.add_argument("--seeds", type=int, default=8, help="data orders (mixing seeds) averaged over")
    p.add_argument("--step-sizes", default="1,10,30,100", help="online data.online.step_size values to try")
    args = p.parse_args(argv)
    if args.budget % (args.stretches * BATCH):
        p.error(f"--budget must be a multiple of --stretches x {BATCH} (whole batches per stretch)")
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = write_synthetic_corpus(
            tmp,
            SIZES,
            valid_per_language=50,
            frames=(FRAMES, FRAMES),
            code_values=K,
            rows_per_shard=500,
            row_group_rows=64,
        )
        corpus = PreparedCorpus.open(root)
        alphabet = {lang: code_counts(corpus, lang, "train") > 0 for lang in K}
        valid = {lang: code_counts(corpus, lang, "valid") for lang in K}
        uniform = dict.fromkeys(K, 1 / 3)
        weightings = {
            "uniform": uniform,
            "temperature a=0.3": resolve_weights("temperature", SIZES, alpha=0.3),
            "proportional": resolve_weights("proportional", SIZES),
            "static minimax (theory)": minimax_weights(),
        }
        onlines = [(f"online step {float(s):g}", float(s)) for s in args.step_sizes.split(",")]
        results: dict[str, list[dict]] = {name: [] for name in weightings}
        for name, _ in onlines:
            results[name], results[f"{name}: final, static"] = [], []
        for seed in range(args.seeds):
            base = MixPlan.build(corpus, uniform, num_rows=0, seed=seed, window_rows=64)
            solo = {
                lang: run(base, Learner(alphabet, valid), args.budget, args.stretches, {lang: 1.0})["losses"][
                    lang
                ]
                for lang in K
            }
            for name, w in weightings.items():
                out = run(base, Learner(alphabet, valid), args.budget, args.stretches, w)
                results[name].append({**out, "solo": solo})
            for name, step in onlines:
                ow = OnlineWeights(uniform, OnlineSettings(signal="excess", step_size=step), solo)
                out = run(base, Learner(alphabet, valid), args.budget, args.stretches, online=ow)
                results[name].append({**out, "solo": solo, "final": ow.weights})
                # A second run at the weights the online run ended with (its online_weights.json).
                again = run(base, Learner(alphabet, valid), args.budget, args.stretches, ow.weights)
                results[f"{name}: final, static"].append({**again, "solo": solo})
            print(f"seed {seed} done ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    summary = {}
    for name, runs in results.items():
        excess = [{lang: r["losses"][lang] - r["solo"][lang] for lang in K} for r in runs]
        summary[name] = {
            "worst": float(np.mean([max(e.values()) for e in excess])),
            "excess": {lang: float(np.mean([e[lang] for e in excess])) for lang in K},
            "rows": {lang: float(np.mean([r["rows"][lang] for r in runs])) for lang in K},
            "final": runs[0].get("final"),
        }
    ref = summary["static minimax (theory)"]["worst"]
    load = os.getloadavg()[0]
    print(
        f"budget {args.budget} rows, {args.stretches} stretches of {args.budget // args.stretches}, "
        f"{args.seeds} seeds; {time.time() - t0:.0f} s at load {load:.1f}"
    )
    print(
        f"{'weighting':<26}{'worst excess':>13}{'vs minimax':>11}   excess en/fr/zh (nats)      rows en/fr/zh"
    )
    for name, s in summary.items():
        e, r = s["excess"], s["rows"]
        print(
            f"{name:<26}{s['worst']:>13.5f}{s['worst'] / ref:>10.2f}x   "
            f"{e['en']:.5f}/{e['fr']:.5f}/{e['zh']:.5f}   {r['en']:.0f}/{r['fr']:.0f}/{r['zh']:.0f}"
            + ("   final w " + "/".join(f"{s['final'][lang]:.2f}" for lang in K) if s["final"] else "")
        )


if __name__ == "__main__":
    main()
