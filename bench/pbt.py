"""PBT over the language weights against the static Tune search, on the known-answer task, at equal trial-steps.

    /work/main/.venv/bin/python bench/pbt.py                       # 8 trials x 100 steps each, 3 seeds
    /work/main/.venv/bin/python bench/pbt.py --trials 16 --seeds 5 --interval 10

The task is tests/tune/test_search.py's known answer: en / fr / zh whose codes are uniform over 16 / 64 / 256
values (easy to hard), 3000 / 1200 / 500 train rows, 10 frames x 8 codebooks per row, 1000 validation rows
each. A trial's "model" is the add-1/2 (Krichevsky-Trofimov) estimate of each language's code distribution
from the rows its weights bought so far (the first n rows of 4 fixed row orders, losses averaged): counted,
not trained, so that dozens of trials take seconds and the balancing weights are known (about en .088,
fr .289, zh .622; the objective is Tune's ``normalized_max``: the worst language's loss minus its solo
run's). A trial is 100 steps of 4 rows (400 rows, within zh's 500).

Three real Ray Tune experiments per seed through :func:`vallex.tune.search.run_search`, each with the same
number of trials of the same steps (equal trial-steps), after the same solo reference runs:

- ``static, optuna``: the default search (Optuna TPE), no early stopping (every trial runs its 100 steps);
- ``static, random``: weights drawn uniformly on the simplex, as PBT's initial population is;
- ``pbt``: ``tune.scheduler=pbt``: the same number of trials as a population, a segment every
  ``--interval`` steps; a trial's state (rows per language so far, its schedule) is its Tune checkpoint,
  so an exploit continues the better trial's counts with perturbed weights.

Printed per experiment: the best trial's objective (mean over seeds, and relative to the theory's static
minimax weights run through the same learner), its rows per language, and for PBT the exploits.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from vallex.config import load_config
from vallex.data.synthetic import write_synthetic_corpus

K = {"en": 16, "fr": 64, "zh": 256}
SIZES = {"en": 3000, "fr": 1200, "zh": 500}
FRAMES, ORDERS, STEPS, BATCH = 10, 4, 100, 4
_DATA: dict = {}


def minimax_weights() -> dict[str, float]:
    lo, hi = 1e-6, 1e6
    for _ in range(200):
        t = math.sqrt(lo * hi)
        lo, hi = (t, hi) if sum((k - 1) / (t + k - 1) for k in K.values()) > 1 else (lo, t)
    return {lang: (k - 1) / (t + k - 1) for lang, k in K.items()}


def learner_data(prepared_dir: str) -> dict:
    """Per language: code counts of every train row, ORDERS row orders, the codes it uses, valid counts
    (cached per process: Tune reuses a trial's actor)."""
    import pyarrow.compute as pc

    from vallex.data.corpus import PreparedCorpus

    if prepared_dir in _DATA:
        return _DATA[prepared_dir]
    corpus = PreparedCorpus.open(prepared_dir)

    def row_counts(lang: str, split: str) -> np.ndarray:
        codes = corpus.read_split(lang, split, columns=["codes", "split"])["codes"].combine_chunks()
        flat = pc.list_flatten(codes).to_numpy().astype(np.int64)
        row = pc.list_parent_indices(codes).to_numpy().astype(np.int64)
        return np.bincount(row * 1024 + flat, minlength=len(codes) * 1024).reshape(len(codes), 1024)

    data = {}
    for lang in K:
        per_row = row_counts(lang, "train")
        rng = np.random.default_rng([7, len(lang)])
        data[lang] = (
            per_row,
            [rng.permutation(len(per_row)) for _ in range(ORDERS)],
            per_row.sum(axis=0) > 0,
            row_counts(lang, "valid").sum(axis=0),
        )
    _DATA[prepared_dir] = data
    return data


def losses(data: dict, rows: dict[str, float]) -> dict[str, dict]:
    """Validation loss per language of the count model that saw ``rows[lang]`` rows of each language."""
    out = {}
    for lang, (per_row, orders, alphabet, valid) in data.items():
        n = min(round(rows.get(lang, 0.0)), len(per_row))
        values = []
        for order in orders:
            q = np.where(alphabet, per_row[order[:n]].sum(axis=0) + 0.5, 0.0)
            q /= q.sum()
            values.append(-(valid[alphabet] * np.log(q[alphabet])).sum() / valid.sum())
        out[lang] = {"loss": float(np.mean(values)), "ar_loss": None, "nar_loss": None}
    return out


def count_trial(config: dict, setup: dict) -> None:
    """A Tune trial of the count learner: static weights (fixed runs, static search), or (PBT) segments
    whose state -- rows per language so far, the schedule -- is the trial's Tune checkpoint."""
    from ray import tune

    from vallex.tune.objective import score
    from vallex.tune.pbt import META_KEY
    from vallex.tune.search import trial_objective, trial_weights

    weights = trial_weights(config, setup)
    objective = trial_objective(config, setup)
    data = learner_data(setup["prepared_dir"])
    steps, every = setup["max_steps"], setup["eval_every"]
    per_step = setup["budget_rows"] / steps

    def metrics(step: int, rows: dict) -> dict:
        valid = losses(data, rows)
        out = {"step": step, **{f"loss/{lang}": v["loss"] for lang, v in valid.items()}}
        out.update({f"rows/{lang}": n for lang, n in rows.items()})
        return {**out, **(score(valid, **objective) if objective else {})}

    if not (setup.get("pbt_interval") and objective):  # a static trial
        for step in [*range(every, steps, every), steps]:
            tune.report(metrics(step, {lang: w * per_step * step for lang, w in weights.items()}))
        return
    trial_id = tune.get_context().get_trial_id()
    checkpoint = tune.get_checkpoint()
    state = checkpoint.get_metadata()[META_KEY] if checkpoint else {"step": 0, "rows": {}, "schedule": []}
    step, rows, schedule = state["step"], dict(state["rows"]), list(state["schedule"])
    cloned = state.get("trial_id") not in (None, trial_id)
    interval = setup["pbt_interval"]
    while step < steps:
        end = min((step // interval + 1) * interval, steps)
        for lang, w in weights.items():
            rows[lang] = rows.get(lang, 0.0) + w * per_step * (end - step)
        entry = {"trial_id": trial_id, "from_step": step, "to_step": end, "weights": weights}
        schedule.append({**entry, **({"cloned_from": state["trial_id"]} if cloned else {})})
        step, cloned = end, False
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = tune.Checkpoint.from_directory(tmp)
            meta = {"trial_id": trial_id, "step": step, "rows": rows, "schedule": schedule, "model": None}
            ckpt.set_metadata({META_KEY: meta})
            tune.report(metrics(step, rows), checkpoint=ckpt)


def run_one(root: Path, prepared: Path, name: str, seed: int, trials: int, overrides: list[str]) -> dict:
    from vallex.tune.search import run_search

    cfg = load_config(
        None,
        [
            f"run.output_dir={root / name}",
            f"run.prepared_dir={prepared}",
            f"run.name={name}",
            f"run.seed={seed}",
            "train.num_workers=1",
            f"train.batch_size={BATCH}",
            f"tune.max_steps_per_trial={STEPS}",
            f"tune.num_samples={trials}",
            "tune.max_concurrent_trials=2",
            "tune.baselines=[uniform]",
            *overrides,
        ],
    )
    best = run_search(cfg, trial_fn=count_trial, reuse_actors=True)
    # The best *search* trial (best_weights.json may name a baseline): what each experiment found.
    rows = [r for r in csv.DictReader((root / name / "tune" / "trials.csv").open()) if r["phase"] == "search"]
    top = min((r for r in rows if r["status"] == "COMPLETE"), key=lambda r: float(r["objective"]))
    weights = {lang: float(top[f"w/{lang}"]) for lang in K}
    exploits = None
    if best["search"]["scheduler"] == "pbt":  # the rows the trial's schedule bought, segment by segment
        population = json.loads((root / name / "tune" / "pbt_schedules.json").read_text())
        exploits = population["exploits"]
        bought = {lang: 0.0 for lang in K}
        for s in population["trials"][top["trial_id"]]["schedule"]:
            for lang, w in s["weights"].items():
                bought[lang] += w * BATCH * (s["to_step"] - s["from_step"])
    else:
        bought = {lang: w * BATCH * STEPS for lang, w in weights.items()}
    return {
        "objective": float(top["objective"]),
        "reference": best["objective"]["reference"],
        "rows": bought,
        "exploits": exploits,
        "weights": weights,
        "uniform": best["baselines"]["uniform"]["objective"],
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=8, help="trials per experiment (PBT: the population)")
    p.add_argument("--interval", type=int, default=25, help="PBT: steps per segment")
    p.add_argument("--seeds", type=int, default=3, help="run.seed values averaged over")
    args = p.parse_args(argv)
    import ray

    from vallex.logs import setup_logging
    from vallex.runtime import init_ray

    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        setup_logging(root / "bench.log")
        prepared = root / "prepare"
        write_synthetic_corpus(
            prepared,
            SIZES,
            valid_per_language=1000,
            frames=(FRAMES, FRAMES),
            code_values=K,
            rows_per_shard=5000,
        )
        init_ray(num_cpus=4)  # logical CPUs: 2 trials at once (a count trial holds only 0.01)
        experiments = {
            "static, optuna": ["tune.scheduler=none", "tune.search=optuna", "tune.eval_every=25"],
            "static, random": ["tune.scheduler=none", "tune.search=random", "tune.eval_every=25"],
            "pbt": [
                "tune.scheduler=pbt",
                f"tune.pbt_interval={args.interval}",
                f"tune.eval_every={args.interval}",
            ],
        }
        results: dict[str, list[dict]] = {name: [] for name in experiments}
        theory = []
        for seed in range(args.seeds):
            for name, overrides in experiments.items():
                tag = name.replace(", ", "-")
                results[name].append(run_one(root, prepared, f"{tag}-{seed}", seed, args.trials, overrides))
            # the theory's minimax weights through the same learner, against the same solo references
            ref = results["pbt"][-1]["reference"]
            valid = losses(
                learner_data(str(prepared)), {k: w * BATCH * STEPS for k, w in minimax_weights().items()}
            )
            theory.append(max(valid[lang]["loss"] - ref[lang] for lang in K))
            print(f"seed {seed} done ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
        ray.shutdown()
    minimax = float(np.mean(theory))
    load = os.getloadavg()[0]
    print(
        f"{args.trials} trials x {STEPS} steps ({args.trials * STEPS} trial-steps) per experiment, PBT segments "
        f"of {args.interval} steps, {args.seeds} seeds; {time.time() - t0:.0f} s at load {load:.1f}"
    )
    print(f"{'experiment':<18}{'best objective':>15}{'vs minimax':>11}   rows en/fr/zh   (per seed)")
    print(
        f"{'minimax (theory)':<18}{minimax:>15.5f}{1.0:>10.2f}x   "
        + "/".join(f"{w * BATCH * STEPS:.0f}" for w in minimax_weights().values())
    )
    uniform = float(np.mean([r["uniform"] for r in results["pbt"]]))
    print(f"{'uniform':<18}{uniform:>15.5f}{uniform / minimax:>10.2f}x")
    for name, runs in results.items():
        mean = float(np.mean([r["objective"] for r in runs]))
        rows = {lang: float(np.mean([r["rows"][lang] for r in runs])) for lang in K}
        per_seed = " ".join(f"{r['objective']:.5f}" for r in runs)
        exploits = f", exploits {[r['exploits'] for r in runs]}" if name == "pbt" else ""
        print(
            f"{name:<18}{mean:>15.5f}{mean / minimax:>10.2f}x   "
            + "/".join(f"{rows[lang]:.0f}" for lang in K)
            + f"   ({per_seed}{exploits})"
        )
    print(json.dumps({name: [r["weights"] for r in runs] for name, runs in results.items()}))


if __name__ == "__main__":
    main()
