"""Searching the language weights with Ray Tune (vallex.tune, ray_jobs/tune.py).

Three layers:

- the objective, the search spaces and the best_weights.json format, as plain functions;
- a known-answer search through real Ray Tune (Optuna TPE, ASHA, fixed runs, reference runs, outputs),
  each trial a cheap but real learner trained on the mixed corpus, so that dozens of trials fit in seconds:
  the search must land on the weights that theory says balance the languages, and beat uniform and
  proportional sampling;
- one small end-to-end search through ``ray_jobs/tune.py`` with real Ray Train + DeepSpeed trials:
  outputs, a trial killed mid-run recorded without ending the search, and an interrupted search resumed.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import train_worker_pids
from vallex.config import ConfigError, load_config
from vallex.data.synthetic import write_synthetic_corpus
from vallex.data.weights import resolve_weights
from vallex.tune import space as spaces
from vallex.tune.objective import pick_best, score
from vallex.tune.search import load_reference, make_setup, run_search, trial_objective, trial_weights
from vallex.tune.state_check import UnsafeTuneStateError, check_experiment_state

ROOT = Path(__file__).resolve().parents[2]
SECRET = "tune-s3cr3t-9d2e"


def _valid(**losses):
    return {lang: {"loss": x, "ar_loss": x / 2, "nar_loss": x / 2} for lang, x in losses.items()}


# --------------------------------------------------------------------------------------------------
# The objective


def test_score_kinds():
    valid = _valid(en=4.0, zh=6.0, ar=5.0)
    assert score(valid, "max") == {"objective": 6.0, "objective_tiebreak": 5.0}
    assert score(valid, "mean")["objective"] == 5.0
    assert score(valid, "spread")["objective"] == 2.0
    ref = {"en": 3.5, "zh": 5.9, "ar": 4.0}
    # zh is the hardest raw, but ar is furthest from what it can reach: it is the one that counts
    out = score(valid, "normalized_max", reference=ref)
    assert out["objective"] == pytest.approx(1.0) and out["norm/zh"] == pytest.approx(0.1)
    assert out["objective_tiebreak"] == 5.0
    ratio = score(valid, "normalized_max", reference=ref, normalize="ratio")
    assert ratio["objective"] == pytest.approx(5.0 / 4.0)
    assert score(valid, "max", metric="ar_loss")["objective"] == 3.0


def test_spread_alone_rewards_every_language_being_equally_bad():
    untrained = _valid(en=13.9, zh=13.9)  # every language at the loss of a random model
    trained = _valid(en=4.0, zh=5.0)
    assert score(untrained, "spread")["objective"] < score(trained, "spread")["objective"]
    assert score(untrained, "max")["objective"] > score(trained, "max")["objective"]


def test_score_errors_name_the_config_key():
    with pytest.raises(ValueError, match="tune.reference"):
        score(_valid(en=1.0), "normalized_max")
    with pytest.raises(ValueError, match=r"tune.reference has no loss for \['zh'\]"):
        score(_valid(en=1.0, zh=2.0), "normalized_max", reference={"en": 1.0})
    no_nar = {"en": {"loss": 1.0, "ar_loss": 1.0, "nar_loss": None}}
    with pytest.raises(ValueError, match="tune.metric=nar_loss"):
        score(no_nar, "max", metric="nar_loss")
    with pytest.raises(ValueError, match="tune.objective"):
        score(_valid(en=1.0), "median")
    # a diverged trial scores worst instead of crashing the workers
    assert score(_valid(en=float("nan"), zh=1.0), "max")["objective"] == math.inf


def test_pick_best_breaks_ties_by_mean_loss():
    rows = [
        {"name": "a", "objective": 1.000, "objective_tiebreak": 5.0},
        {"name": "b", "objective": 1.005, "objective_tiebreak": 4.0},  # within 1%: tied, lower mean
        {"name": "c", "objective": 1.2, "objective_tiebreak": 1.0},
        {"name": "d", "objective": math.inf, "objective_tiebreak": 0.0},
    ]
    assert pick_best(rows, 0.01)["name"] == "b"
    assert pick_best(rows, 0.0)["name"] == "a"
    assert pick_best([{"objective": math.nan}]) is None


# --------------------------------------------------------------------------------------------------
# Search spaces


@pytest.mark.parametrize("space", ["stick", "logits"])
def test_space_round_trip_and_floor(space):
    langs = ["ar", "en", "fr", "zh"]
    rng = np.random.default_rng(0)
    for _ in range(50):
        p = rng.dirichlet(np.ones(4))
        w = {lang: 0.02 + 0.92 * v for lang, v in zip(langs, p, strict=True)}
        params = spaces.to_params(space, w, langs, min_weight=0.02)
        if params is None:  # logits: outside [-4, 4]
            assert space == "logits"
            continue
        back = spaces.to_weights(space, params, langs, min_weight=0.02)
        assert back == pytest.approx(w, abs=1e-9)
    lo, hi = (0.0, 1.0) if space == "stick" else (-spaces.LOGIT_RANGE, spaces.LOGIT_RANGE)
    for _ in range(50):
        params = {n: rng.uniform(lo, hi) for n in spaces.param_names(space, langs)}
        w = spaces.to_weights(space, params, langs, min_weight=0.05)
        assert sum(w.values()) == pytest.approx(1.0) and min(w.values()) >= 0.05 - 1e-12
    # a weight under the floor is not in the space
    assert spaces.to_params(space, {"ar": 0.001, "en": 0.5, "fr": 0.3, "zh": 0.199}, langs, 0.01) is None


def test_stick_breaking_draws_uniformly_on_the_simplex():
    """Uniform parameters give Dirichlet(1,1,1): each weight has mean 1/3 and P(w > 1/2) = 1/4."""
    langs = ["a", "b", "c"]
    rng = np.random.default_rng(1)
    draws = np.array(
        [
            list(
                spaces.to_weights("stick", {"stick_a": rng.random(), "stick_b": rng.random()}, langs).values()
            )
            for _ in range(20000)
        ]
    )
    assert draws.mean(axis=0) == pytest.approx([1 / 3] * 3, abs=0.01)
    assert (draws > 0.5).mean(axis=0) == pytest.approx([0.25] * 3, abs=0.015)


def test_temperature_space_spans_uniform_to_proportional():
    counts = {"en": 900, "ar": 100}
    w0 = spaces.to_weights("temperature", {"alpha": 0.0}, list(counts), counts=counts)
    w1 = spaces.to_weights("temperature", {"alpha": 1.0}, list(counts), counts=counts)
    assert w0 == pytest.approx({"ar": 0.5, "en": 0.5}) and w1 == pytest.approx({"ar": 0.1, "en": 0.9})


# --------------------------------------------------------------------------------------------------
# Config, setup and the best_weights.json contract


def test_config_keys_and_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"tune.baselines\[1\]: must be one of"):
        load_config(None, ["tune.baselines=[uniform, inverse]"])
    with pytest.raises(ConfigError, match="tune.grace_steps"):
        load_config(None, ["tune.max_steps_per_trial=10", "tune.grace_steps=20"])
    with pytest.raises(ConfigError, match="tune.objective"):
        load_config(None, ["tune.objective=median"])
    write_synthetic_corpus(tmp_path / "prepare", {"en": 10, "zh": 10, "ar": 5})
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "tune.min_weight=0.4"])
    with pytest.raises(ValueError, match=r"tune.min_weight=0.4 x 3 languages"):
        make_setup(cfg)
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "tune.reference=missing.json"])
    with pytest.raises(ValueError, match="tune.reference: 'missing.json'"):
        make_setup(cfg)


def test_setup_fixed_runs_and_reference_from_a_report(tmp_path):
    write_synthetic_corpus(tmp_path / "prepare", {"en": 90, "ar": 10})
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "train.max_steps=3"])
    setup = make_setup(cfg)
    assert list(setup["fixed"]) == ["uniform", "proportional", "temperature", "unimax", "solo-ar", "solo-en"]
    assert setup["fixed"]["proportional"] == pytest.approx({"ar": 0.1, "en": 0.9})
    assert setup["fixed"]["temperature"] == pytest.approx(
        resolve_weights("temperature", setup["counts"], alpha=0.3)
    )
    assert setup["fixed"]["solo-ar"] == {"ar": 1.0, "en": 0.0}
    # the trial budget, not train.max_steps, sizes unimax: 100 steps x batch 8 x 2 workers
    assert setup["budget_rows"] == 100 * 8 * 2
    assert trial_objective({"run": "uniform"}, setup) is None
    point = {"stick_ar": 0.5}
    assert trial_weights(point, setup) == pytest.approx({"ar": 0.5, "en": 0.5})
    assert trial_objective(point, setup)["kind"] == "normalized_max"

    report = tmp_path / "report.json"
    report.write_text(
        json.dumps({"languages": {"en": {"last": {"loss": 5.0}}, "ar": {"last": {"loss": 7.5}}}})
    )
    assert load_reference(str(report), ["ar", "en"], "loss") == {"ar": 7.5, "en": 5.0}
    with pytest.raises(ValueError, match=r"no reference loss for \['fr'\]"):
        load_reference({"en": 1.0}, ["en", "fr"], "loss")
    cfg = load_config(None, [f"run.output_dir={tmp_path}", f"tune.reference={report}", "tune.baselines=[]"])
    setup = make_setup(cfg)
    assert setup["fixed"] == {} and setup["reference"] == {"ar": 7.5, "en": 5.0}


def test_trial_concurrency_leaves_a_cpu_for_ray_data(ray_cluster):
    from vallex.tune.search import trial_concurrency

    def conc(*overrides):
        return trial_concurrency(load_config(None, list(overrides)))

    assert conc("train.num_workers=2", "train.cpus_per_worker=0.45") == 2  # 1.91 CPUs each on 4
    # 2 x 0.5 + 1 + the driver's 0.01 = 2.01: only one fits, or Ray Data's read task would starve
    assert conc("train.num_workers=2", "train.cpus_per_worker=0.5") == 1
    assert conc("train.num_workers=1", "tune.max_concurrent_trials=3") == 3
    with pytest.raises(ValueError, match=r"= 4.01 CPUs, the cluster has 4; set train.cpus_per_worker=0.99"):
        conc("train.num_workers=3", "train.cpus_per_worker=1.0")


def test_tune_help_lists_the_tune_keys(capsys):
    sys.path.insert(0, str(ROOT / "ray_jobs"))
    try:
        import importlib

        tune_job = importlib.import_module("tune")
        assert tune_job.__file__ == str(ROOT / "ray_jobs" / "tune.py")
        with pytest.raises(SystemExit):
            tune_job.main(["--help"])
    finally:
        sys.path.remove(str(ROOT / "ray_jobs"))
        sys.modules.pop("tune", None)
    out = capsys.readouterr().out
    for key in ("tune.num_samples", "tune.objective", "tune.reference", "tune.space", "tune.baselines"):
        assert key in out
    assert "best_weights.json" in out and "train.num_workers" in out


# --------------------------------------------------------------------------------------------------
# Known answer: a real Tune search over a cheap, real learner.
#
# Three languages whose codes are uniform over K values (synthetic code_values): en K=16 (easy, large),
# fr K=64, zh K=256 (hard, small). The learner of a trial is the add-1/2 (Krichevsky-Trofimov) estimate
# of each language's code distribution from the rows its weight buys out of the trial budget: n_l =
# w_l x budget rows, T tokens per row. Its validation cross-entropy is log K_l plus an excess of about
# (K_l - 1) / (2 n_l T). The solo reference run (all the budget on one language) reaches (K_l - 1)/(2 B T),
# so the normalized excess is (K_l - 1)(1/w_l - 1)/(2 B T): the minimax weights solve
# (K_l - 1)(1/w_l - 1) = t for every l, i.e. w_l = (K_l - 1)/(t + K_l - 1) with sum 1 (t ~ 155):
# about en 0.09, fr 0.29, zh 0.62 -- far from uniform (1/3 each) and from proportional (zh 0.11).

K = {"en": 16, "fr": 64, "zh": 256}
SIZES = {"en": 3000, "fr": 1200, "zh": 500}
FRAMES = 10  # x 8 codebooks = 80 code tokens per row
ORDERS = 4  # the learner's loss is averaged over this many data orders (less sampling noise)


def _known_answer() -> dict[str, float]:
    lo, hi = 1e-6, 1e6
    for _ in range(200):  # bisection on t: sum of (K-1)/(t+K-1) falls from 3 to 0
        t = math.sqrt(lo * hi)
        total = sum((k - 1) / (t + k - 1) for k in K.values())
        lo, hi = (t, hi) if total > 1 else (lo, t)
    return {lang: (k - 1) / (t + k - 1) for lang, k in K.items()}


_LEARNER_CACHE: dict = {}


def _learner_data(prepared_dir: str, languages: list[str]):
    """Per language: code counts of every train row, ORDERS row orders, the codes it uses, valid counts.
    Cached per process: Tune reuses a trial's actor for the next trial."""
    import pyarrow.compute as pc

    from vallex.data.corpus import PreparedCorpus

    key = (prepared_dir, tuple(languages))
    if key in _LEARNER_CACHE:
        return _LEARNER_CACHE[key]
    corpus = PreparedCorpus.open(prepared_dir)

    def row_counts(split: str) -> np.ndarray:
        codes = corpus.read_split(lang, split, columns=["codes", "split"])["codes"].combine_chunks()
        flat = pc.list_flatten(codes).to_numpy().astype(np.int64)
        row = pc.list_parent_indices(codes).to_numpy().astype(np.int64)
        return np.bincount(row * 1024 + flat, minlength=len(codes) * 1024).reshape(len(codes), 1024)

    data = {}
    for lang in languages:
        per_row = row_counts("train")
        alphabet = per_row.sum(axis=0) > 0  # the codes the language uses (its "tokenizer")
        rng = np.random.default_rng([7, len(lang)])
        orders = [rng.permutation(len(per_row)) for _ in range(ORDERS)]
        data[lang] = (per_row, orders, alphabet, row_counts("valid").sum(axis=0))
    _LEARNER_CACHE[key] = data
    return data


def unigram_trial(config: dict, setup: dict) -> None:
    """A Tune trial whose 'model' is counted, not trained: what the trial's weights let it see."""
    from ray import tune

    weights = trial_weights(config, setup)
    objective = trial_objective(config, setup)
    data = _learner_data(setup["prepared_dir"], setup["languages"])
    steps, every = setup["max_steps"], setup["eval_every"]
    for step in list(range(every, steps, every)) + [steps]:
        rows_seen = setup["budget_rows"] * step / steps
        valid = {}
        for lang, (per_row, orders, alphabet, valid_counts) in data.items():
            n = min(round(weights[lang] * rows_seen), len(per_row))
            losses = []
            for order in orders:
                seen = per_row[order[:n]].sum(axis=0)
                q = np.where(alphabet, seen + 0.5, 0.0)
                q /= q.sum()
                losses.append(-(valid_counts[alphabet] * np.log(q[alphabet])).sum() / valid_counts.sum())
            valid[lang] = {"loss": float(np.mean(losses)), "ar_loss": None, "nar_loss": None}
        metrics = {"step": step, **{f"loss/{lang}": v["loss"] for lang, v in valid.items()}}
        if objective:
            metrics.update(score(valid, **objective))
        tune.report(metrics)


def test_known_answer_search_lands_on_the_balancing_weights(ray_cluster, tmp_path):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers can't import tests/
    write_synthetic_corpus(
        tmp_path / "prepare",
        SIZES,
        valid_per_language=1000,
        frames=(FRAMES, FRAMES),
        code_values=K,
        rows_per_shard=5000,
    )
    cfg = load_config(
        None,
        [
            f"run.output_dir={tmp_path}",
            "run.name=known",
            "train.num_workers=1",
            "train.batch_size=4",  # budget: 100 steps x 4 rows = 400 rows, within zh's 500
            "tune.max_steps_per_trial=100",
            "tune.eval_every=25",
            "tune.num_samples=30",
            "tune.max_concurrent_trials=2",
        ],
    )
    t0 = time.time()
    best = run_search(cfg, trial_fn=unigram_trial, reuse_actors=True)
    elapsed = time.time() - t0
    print(f"known-answer search: {elapsed:.1f} s, best {best['weights']}")

    target = _known_answer()
    assert target == pytest.approx({"en": 0.09, "fr": 0.29, "zh": 0.62}, abs=0.01)
    assert best["source"] == "search"
    # lands near the balancing weights (uniform is 0.33 away on zh, proportional 0.5)
    for lang, w in best["weights"].items():
        assert abs(w - target[lang]) < 0.1, (lang, w, target)
    # and beats the baselines on the objective by a wide margin
    base = best["baselines"]
    assert best["objective"]["value"] < 0.6 * base["uniform"]["objective"]
    assert best["objective"]["value"] < 0.3 * base["proportional"]["objective"]
    assert best["objective"]["value"] < base["temperature"]["objective"]
    assert best["objective"]["value"] < base["unimax"]["objective"]
    # the reference losses are the solo runs': log K plus a small excess
    for lang, ref in best["objective"]["reference"].items():
        assert math.log(K[lang]) < ref < math.log(K[lang]) + 0.02

    out = tmp_path / "tune"
    saved = json.loads((out / "best_weights.json").read_text())
    assert saved["weights"] == best["weights"]
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert sum(r["phase"] == "search" for r in rows) == 30
    assert {r["name"] for r in rows if r["phase"] == "fixed"} == {
        "uniform",
        "proportional",
        "temperature",
        "unimax",
        "solo-en",
        "solo-fr",
        "solo-zh",
    }
    # ASHA stopped some trials at half budget; the best one ran all of it
    assert any(r["status"] == "STOPPED" for r in rows) and saved["search"]["complete"] >= 3
    assert (out / "tune_losses.png").stat().st_size > 5000
    # the file is what data.weights takes
    assert resolve_weights(str(out / "best_weights.json"), SIZES) == pytest.approx(best["weights"])


# --------------------------------------------------------------------------------------------------
# End to end: ray_jobs/tune.py with real Ray Train + DeepSpeed trials, a failure and a resume.


def _run_job(config: Path, env: dict, on_line=None, timeout: float = 240) -> tuple[int, list[str]]:
    """ray_jobs/tune.py in a subprocess joined to the test cluster; ``on_line(line, proc)`` sees its log."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "ray_jobs" / "tune.py"), "--config", str(config)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            lines.append(line.rstrip())
            if on_line:
                on_line(line, proc)
        rc = proc.wait()
    finally:
        timer.cancel()
    return rc, lines


def test_end_to_end_search_records_a_failed_trial_and_resumes(ray_cluster, tmp_path):
    write_synthetic_corpus(
        tmp_path / "prepare",
        {"en": 40, "zh": 24},
        valid_per_language=4,
        frames=(15, 30),
        code_values={"en": 32},
    )
    config = tmp_path / "tune.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run": {"output_dir": str(tmp_path), "name": "e2e"},
                # Secrets no file of the run may hold (docs/SECURITY.md): an env var's value, and a
                # tracking URI's password (unused: train.tracking is off).
                "job": {"runtime_env": {"env_vars": {"WANDB_API_KEY": SECRET}}},
                "model": {"size": "tiny"},
                "data": {"window_rows": 32},
                "train": {
                    # One worker a trial (two start twice the processes; test_train covers two):
                    # 0.9 + 1 (Ray Data) + 0.01 (driver) = 1.91 CPUs, 2 trials on 4 CPUs.
                    "num_workers": 1,
                    "cpus_per_worker": 0.9,
                    "zero_stage": 2,
                    "batch_size": 4,
                    "warmup_steps": 1,
                    "tracking_uri": f"https://vallex:{SECRET}-pw@mlflow.example:5000",
                    # the search scores losses: no listening samples, no text gain (a second validation pass)
                    "intelligibility": {"samples": False, "text_gain": False},
                },
                "tune": {
                    "num_samples": 3,
                    "max_steps_per_trial": 4,
                    "eval_every": 2,
                    "baselines": ["uniform"],
                    "reference": {"en": 9.0, "zh": 12.0},  # normalized_max scored by the workers
                    "max_failures": 0,
                },
            }
        )
    )
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    out = tmp_path / "tune"
    killed: list[int] = []

    def kill_a_search_worker():
        """SIGKILL one Train worker of a running search trial, once it has evaluated step 1."""
        deadline = time.time() + 200
        while time.time() < deadline and not killed:
            for metrics in (
                (out / "trials").glob("*/train/metrics.jsonl") if (out / "trials").exists() else []
            ):
                trial = metrics.parent.parent.name
                if trial in fixed_trials or not metrics.read_text().strip():
                    continue
                # Only workers started since the fixed run ended: a search trial's, never a lingering one.
                pids = [p for p in train_worker_pids() if p not in fixed_pids]
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed.append(pids[-1])
                    return
            time.sleep(0.1)

    fixed_trials: set[str] = set()
    fixed_pids: set[int] = set()
    finished: list[str] = []
    failed: list[str] = []

    def watch(line: str, proc):
        if "fixed uniform done" in line:  # the fixed run's trial dir is known: not the one to kill
            fixed_trials.update(p.name for p in (out / "trials").iterdir())
            fixed_pids.update(train_worker_pids())
            threading.Thread(target=kill_a_search_worker, daemon=True).start()
        message = line.split(" ", 1)[-1]
        if message.startswith("search ") and " done in " in message:
            finished.append(line)
        if message.startswith("search ") and " FAILED" in message:
            failed.append(line)
        if finished and failed and not interrupted:  # Ctrl+C once a trial ended and the killed one failed
            interrupted.append(line)
            proc.send_signal(signal.SIGINT)

    interrupted: list[str] = []

    t0 = time.time()
    rc, first = _run_job(config, env, watch)
    t_first = time.time() - t0
    log_1 = "\n".join(first)
    assert killed, log_1
    assert rc == 130 and "run the same command again to resume" in log_1, log_1
    assert "FAILED" in log_1 and "recorded in trials.csv, the search goes on" in log_1
    assert not (out / "best_weights.json").exists()

    t0 = time.time()
    rc, second = _run_job(config, env)
    t_second = time.time() - t0
    log_2 = "\n".join(second)
    assert rc == 0, log_2
    print(f"end-to-end: first run {t_first:.0f} s, resumed run {t_second:.0f} s")
    assert "resuming e2e-tune-fixed" in log_2 and "resuming e2e-tune-search" in log_2
    assert "fixed uniform started" not in log_2  # the finished baseline is not trained again
    # only the trials that had not run (or were interrupted) run now: not the finished or failed one
    concluded_1 = {m.group(1) for m in re.finditer(r" search (\w+) (?:done in|FAILED)", log_1)}
    started_2 = {m.group(1) for m in re.finditer(r" search (\w+) started", log_2)}
    assert len(concluded_1) == 2 and started_2 and not started_2 & concluded_1, (concluded_1, started_2)

    rows = list(csv.DictReader((out / "trials.csv").open()))
    search = [r for r in rows if r["phase"] == "search"]
    assert len(search) == 3 and [r["name"] for r in rows if r["phase"] == "fixed"] == ["uniform"]
    errors = [r for r in search if r["status"] == "ERROR"]
    assert len(errors) == 1 and "Error" in errors[0]["error"], errors
    complete = [r for r in search if r["status"] == "COMPLETE"]
    stopped = [r for r in search if r["status"] == "STOPPED"]  # ASHA may stop one at its step-2 rung
    assert len(complete) >= 1 and len(complete) + len(stopped) == 2 and all(r["step"] == "2" for r in stopped)
    for r in complete:  # the workers' objective is the score of the losses they reported
        losses = {lang: float(r[f"loss/{lang}"]) for lang in ("en", "zh")}
        expect = max(losses["en"] - 9.0, losses["zh"] - 12.0)
        assert float(r["objective"]) == pytest.approx(expect, rel=1e-6)
        assert float(r["w/en"]) + float(r["w/zh"]) == pytest.approx(1.0)

    best = json.loads((out / "best_weights.json").read_text())
    assert best["objective"]["kind"] == "normalized_max" and best["objective"]["reference"] == {
        "en": 9.0,
        "zh": 12.0,
    }
    assert best["search"] == {
        "trials": 3,
        "complete": len(complete),
        "stopped_early": len(stopped),
        "failed": 1,
        "space": "stick",
        "algorithm": "optuna",
        "scheduler": "asha",
    }
    assert set(best["baselines"]) == {"uniform"}
    assert (out / "tune_losses.png").stat().st_size > 5000
    # every trial trained for real: its own Ray Train run wrote a per-language report
    trained = [r for r in rows if r["status"] == "COMPLETE"]
    for r in trained:
        report = json.loads((out / "trials" / r["trial_id"] / "train" / "report.json").read_text())
        assert report["steps"] == 4 and set(report["languages"]) == {"en", "zh"}
        assert report["weights"] == pytest.approx({lang: float(r[f"w/{lang}"]) for lang in ("en", "zh")})
    # train.py takes the file as data.weights
    cfg = load_config(config, [f"data.weights={out / 'best_weights.json'}"])
    assert resolve_weights(cfg.data.weights, {"en": 40, "zh": 24}) == pytest.approx(best["weights"])
    # No file the search wrote (trial configs, Tune's and Train's state and checkpoints, reports, logs)
    # holds the secrets of the config it was given.
    holding = [
        str(p.relative_to(tmp_path))
        for p in tmp_path.rglob("*")
        if p.is_file() and p != config and SECRET.encode() in p.read_bytes()
    ]
    assert not holding, holding
    assert (
        "WANDB_API_KEY: <redacted>"
        in (out / "trials" / trained[0]["trial_id"] / "train" / "config.yaml").read_text()
    )

    # A resume runs no code from train.storage_path (docs/SECURITY.md). The real state of both experiments
    # passed the check (the resume above); a pickle that would `touch` a marker, planted in a trial's
    # pickled field of the fixed runs' state, is refused by file and trial before Tune reads anything
    # (in-process: refused before any trial starts).
    storage = Path(load_config(config).storage_path)
    assert all(check_experiment_state(str(storage / f"e2e-tune-{e}")) > 5 for e in ("fixed", "search"))
    marker = tmp_path / "planted-code-ran"
    state_file, trial_id = _plant_in_experiment_state(storage / "e2e-tune-fixed", f"touch {marker}")
    with pytest.raises(UnsafeTuneStateError) as refused:
        run_search(load_config(config))
    message = str(refused.value)
    assert state_file.name in message and trial_id in message and "posix.system" in message, message
    assert "another run.name" in message
    assert not marker.exists()


def _plant_in_experiment_state(experiment: Path, command: str) -> tuple[Path, str]:
    """Replace a trial's pickled placement group in the newest experiment_state-*.json with a pickle that
    runs ``command`` when Ray unpickles it (Tuner.restore does, without the check)."""
    import pickle

    class Planted:
        def __reduce__(self):
            return os.system, (command,)

    state_file = max(experiment.glob("experiment_state-*.json"))
    state = json.loads(state_file.read_text())
    trial = json.loads(state["trial_data"][0][0])
    trial["placement_group_factory"] = pickle.dumps(Planted()).hex()
    state["trial_data"][0][0] = json.dumps(trial)
    state_file.write_text(json.dumps(state))
    return state_file, trial["trial_id"]


def test_asha_rungs_without_an_evaluation_before_the_last_step_are_flagged():
    from vallex.tune.search import warn_late_rungs

    assert warn_late_rungs(100, 25, 50) == []  # judged at step 50, an evaluation before the end
    assert warn_late_rungs(90, 10, 10) == [90]  # rungs 10, 30, 90: the last one is the final step
    assert warn_late_rungs(100, 60, 40) == []  # rung 40 is judged at step 60
    assert warn_late_rungs(100, 70, 80) == [80]  # the first report at or after 80 is step 100, the last
