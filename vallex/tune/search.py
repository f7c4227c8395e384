"""Search the language sampling weights with Ray Tune: short training runs scored on balanced losses.

Two Tune experiments under the run's storage, each resumable on its own:

1. ``<run.name>-tune-fixed``: the *fixed* runs, one Tune trial each, all with the trial budget: the
   baselines (``tune.baselines``: uniform, proportional, temperature alpha=0.3, unimax) and, for
   ``tune.reference=solo``, one reference run per language with the whole budget on it alone. Their
   objectives are computed afterwards from their final losses with the same
   :func:`vallex.tune.objective.score` the search uses.
2. ``<run.name>-tune-search``: ``tune.num_samples`` trials over the weight simplex
   (:mod:`vallex.tune.space`), proposed by Optuna's TPE (told the baselines' scores first), stopped
   early by ASHA on the training step, the objective computed by the workers at every evaluation.

Each trial is a Train V2 *driver function* (:func:`train_trial`): it builds the trial's config
(its own output and Ray Train run, the shared prepared corpus, the trial's weights) and calls
:func:`vallex.train.trainer.train` with Tune's ``TuneReportCallback``, so the mixed dataset is built
inside the trial. The driver itself holds 0.01 CPU; the trial's Train workers hold the real resources.

Outputs in ``<run.output_dir>/tune/``: ``best_weights.json`` (what ``data.weights`` takes),
``trials.csv`` (every run: weights, per-language losses, objective, status, error) and
``tune_losses.png`` (per-language losses of the baselines and the best trials).
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import math
import os
import random
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ray.tune import Callback

from vallex.config import Config
from vallex.files import save_figure, write_text
from vallex.tune import pbt as pbts
from vallex.tune import space as spaces
from vallex.tune.objective import pick_best, score
from vallex.tune.state_check import check_experiment_state
from vallex.tune.trial import trial_config, trial_objective, trial_weights

log = logging.getLogger("vallex.tune")

FIXED, SEARCH = "fixed", "search"
SOLO_PREFIX = "solo-"
BEST_FILE, TRIALS_FILE, PLOT_FILE = "best_weights.json", "trials.csv", "tune_losses.png"


# ---------------------------------------------------------------------------------------------------
# What a trial needs: the "setup" every trial function receives (plain data, shared by all trials).


def make_setup(cfg: Config) -> dict[str, Any]:
    """Resolve languages, counts, baselines and budgets on the driver, before any trial starts.

    ``setup["plan"]`` is the trials' base :class:`~vallex.train.plan.RunPlan` (sized for
    ``tune.max_steps_per_trial``); a trial is that plan with its own weights."""
    from vallex.data.weights import resolve_weights
    from vallex.train.plan import plan_run

    t = cfg.tune
    plan = plan_run(cfg, max_steps=t.max_steps_per_trial)
    languages, counts, budget = list(plan.languages), dict(plan.counts), plan.budget_rows
    if len(languages) < 2:
        raise ValueError(f"data.languages: a weight search needs at least 2 languages, got {languages}")
    empty = sorted(lang for lang, n in counts.items() if n == 0)
    if empty:
        raise ValueError(f"data.languages: {empty} have no train rows in {cfg.prepared_dir}")
    spaces.param_names(t.space, languages)  # checks tune.space
    spaces.check_min_weight(languages, t.min_weight)

    fixed: dict[str, dict[str, float]] = {}
    for name in t.baselines:
        fixed[name] = resolve_weights(name, counts, alpha=t.baseline_alpha, budget=budget)
    reference = None
    if t.objective == "normalized_max":
        if t.reference == "solo":
            for lang in languages:
                fixed[SOLO_PREFIX + lang] = {other: float(other == lang) for other in languages}
        else:
            reference = load_reference(t.reference, languages, t.metric)
    out_dir = (cfg.output_dir / "tune").resolve()
    storage = cfg.storage_path
    return {
        "base": cfg.to_dict(),
        "plan": plan,
        "languages": languages,
        "counts": counts,
        "budget_rows": budget,
        "fixed": fixed,
        "reference": reference,
        "objective": {"kind": t.objective, "metric": t.metric, "normalize": t.normalize},
        "space": t.space,
        "min_weight": t.min_weight,
        "max_steps": t.max_steps_per_trial,
        "eval_every": t.eval_every,
        "pbt_interval": pbts.interval(t) if t.scheduler == "pbt" else 0,  # steps per PBT segment
        "prepared_dir": cfg.prepared_dir,
        "out_dir": str(out_dir),
        "train_storage": storage.rstrip("/") + f"/{cfg.run.name}-tune-train",
    }


def load_reference(spec: str | Mapping[str, float], languages: list[str], metric: str) -> dict[str, float]:
    """``tune.reference`` given as a map or as a training run's report.json (its last losses)."""
    if isinstance(spec, Mapping):
        ref, source = {k: float(v) for k, v in spec.items()}, "tune.reference"
    else:
        path = Path(spec)
        if not path.is_file():
            raise ValueError(
                f"tune.reference: {spec!r} is neither 'solo' nor an existing report.json "
                "(or give a map {en: 5.1, ...})"
            )
        try:
            report = json.loads(path.read_text())
            ref = {lang: float(v["last"][metric]) for lang, v in report["languages"].items()}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"tune.reference: {path} is not a training report.json with languages.<lang>.last.{metric} "
                f"({type(e).__name__}: {e})"
            ) from None
        source = f"tune.reference ({path})"
    missing = sorted(set(languages) - set(ref))
    if missing:
        raise ValueError(f"{source}: no reference loss for {missing} (it has {sorted(ref)})")
    return {lang: ref[lang] for lang in languages}


def train_trial(config: dict, setup: dict) -> None:
    """One Tune trial: a short Ray Train + DeepSpeed run with the trial's weights (Train V2 driver)."""
    from ray import tune
    from ray.data import DataContext
    from ray.tune.integration.ray_train import TuneReportCallback

    from vallex.train.trainer import train

    DataContext.get_current().enable_progress_bars = False
    trial_id = tune.get_context().get_trial_id()
    weights = trial_weights(config, setup)
    cfg = trial_config(setup, weights, trial_id)
    # The search's base plan with this trial's weights and its own checkpoint storage: nothing resolved again.
    plan = setup["plan"].with_weights(weights, storage_path=cfg.storage_path)
    kwargs = trial_objective(config, setup)
    objective = functools.partial(score, **kwargs) if kwargs is not None else None
    train(cfg, plan=plan, callbacks=[TuneReportCallback()], objective=objective)


# ---------------------------------------------------------------------------------------------------
# Running the two experiments.


DRIVER_CPU = 0.01  # what a trial's driver function holds (Tune refuses a trial of 0 resources)


def trial_concurrency(cfg: Config) -> int:
    """Trials at once: each needs its workers' CPUs (and GPUs), 1 CPU for Ray Data's reads, and the
    driver's 0.01 CPU. (Without that 0.01 a cluster of exactly workers + 1 CPUs leaves 0.99 free, and
    the mixed dataset's 1-CPU read tasks wait forever.)"""
    import ray

    tr = cfg.train
    res = ray.cluster_resources()
    per_trial = tr.num_workers * tr.cpus_per_worker + 1.0 + DRIVER_CPU
    cpus = res.get("CPU", 0.0)
    if cpus < per_trial - 1e-9:
        fit = math.floor((cpus - 1.0 - DRIVER_CPU) / tr.num_workers * 100) / 100
        msg = (
            f"one trial needs train.num_workers x train.cpus_per_worker + 1 CPU for Ray Data + {DRIVER_CPU} "
            f"for the trial's driver = {per_trial:g} CPUs, the cluster has {cpus:g}; "
            + (f"set train.cpus_per_worker={fit:g} or lower" if fit > 0 else "lower train.num_workers")
        )
        if os.environ.get("RAY_ADDRESS"):  # a cluster that may autoscale: say it, don't refuse
            log.warning("WARNING: %s", msg)
            return 1
        raise ValueError(msg)
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    n = int((cpus + 1e-9) // per_trial)
    if tr.use_gpu:
        n = min(n, max(1, int(res.get("GPU", 0) // tr.num_workers)))
    return max(1, n)


HEARTBEAT_S = 30.0  # the longest the search stays silent while trials run
_ACTIVE: dict[str, Progress] = {}  # phase -> the Progress callback of the experiment running now


class Progress(Callback):
    """One log line per trial (started, done / stopped early, failed); tells whether all concluded.

    Tuner.restore brings back the callbacks pickled with the experiment, not the ones passed now: each
    registers itself in ``_ACTIVE`` when its experiment starts, so the caller finds the live one.
    """

    def __init__(self, phase: str, total: int, setup: Mapping[str, Any]):
        # Pickled with the experiment's state: keep what the lines need, never the run's config ("base").
        self.phase, self.total = phase, total
        self.trial_setup = {k: v for k, v in setup.items() if k not in ("base", "plan")}
        self.max_steps = setup["max_steps"]
        self.started: dict[str, float] = {}
        # Concluded trials: those already concluded when a resumed experiment starts, plus those that
        # end or fail now. (Tune marks the trials it stops on Ctrl+C TERMINATED too, so the final
        # statuses cannot tell an interrupted search from a finished one.)
        self.before: set[str] | None = None
        self.now: set[str] = set()
        self.concluded = 0

    def setup(self, **info):
        self.before, self.now, self.started = None, set(), {}
        self.last_line = time.time()
        _ACTIVE[self.phase] = self

    def _label(self, trial) -> str:
        return f"{self.phase} {trial.config.get('run', trial.trial_id)}"

    def _count(self) -> int:
        return len((self.before or set()) | self.now)

    def on_step_begin(self, iteration, trials, **info):
        if self.before is None:
            self.before = {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}
        # A trial's own lines stay in its worker: say which are running when nothing was said for a while.
        now = time.time()
        if now - getattr(self, "last_line", now) >= HEARTBEAT_S:
            running = [t for t in trials if t.status == "RUNNING"]
            if running:
                log.info(
                    "%s trials running: %s",
                    self.phase,
                    ", ".join(
                        f"{t.config.get('run', t.trial_id)} ({now - self.started.get(t.trial_id, now):.0f} s, "
                        f"step {(t.last_result or {}).get('step', 0)})"
                        for t in running
                    ),
                )
            self.last_line = now

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started[trial.trial_id] = time.time()
        try:
            weights = " ".join(
                f"{k}={v:.3f}" for k, v in trial_weights(trial.config, self.trial_setup).items()
            )
        except Exception as e:  # a display line must not stop the search
            weights = f"(weights unknown: {e})"
        how = "started"
        if self.trial_setup.get("pbt_interval") and trial.checkpoint is not None:
            try:  # a PBT member restarting: from its own checkpoint, or (exploit) from a better trial's
                state = trial.checkpoint.get_metadata().get(pbts.META_KEY, {})
                source = state.get("trial_id")
                how = f"continues at step {state.get('step')} from " + (
                    "its own checkpoint"
                    if source == trial.trial_id
                    else f"trial {source}'s checkpoint (exploit)"
                )
            except Exception as e:  # a display line must not stop the search
                how = f"restarted (checkpoint unreadable: {e})"
        log.info("%s %s: weights %s", self._label(trial), how, weights)
        self.last_line = time.time()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.now.add(trial.trial_id)
        r = trial.last_result or {}
        step = r.get("step")
        how = "done" if step == self.max_steps else f"stopped early at step {step} (ASHA)"
        obj = r.get("objective")
        losses = " ".join(
            f"{k.split('/', 1)[1]} {v:.3f}" for k, v in sorted(r.items()) if k.startswith("loss/")
        )
        log.info(
            "%s %s in %.0f s (%d/%d)%s | %s",
            self._label(trial),
            how,
            time.time() - self.started.get(trial.trial_id, time.time()),
            self._count(),
            self.total,
            f" | objective {obj:.4f}" if isinstance(obj, (int, float)) else "",
            losses,
        )
        self.last_line = time.time()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.now.add(trial.trial_id)
        log.warning(
            "%s FAILED (%d/%d): %s; recorded in %s, the search goes on",
            self._label(trial),
            self._count(),
            self.total,
            _first_line(getattr(trial, "error_file", None)),
            TRIALS_FILE,
        )

    def on_experiment_end(self, trials, **info):
        if self.before is None:  # nothing ran this time: the statuses are the restored ones
            self.before = {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}
        self.concluded = self._count()


class SearchInterrupted(RuntimeError):
    """The search stopped before every trial concluded (Ctrl+C, a lost driver); its state is saved."""


def _first_line(error_file: str | None) -> str:
    if not error_file or not os.path.exists(error_file):
        return "see the trial's error.txt"
    lines = [line for line in Path(error_file).read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "see the trial's error.txt"


def _run_experiment(
    cfg: Config,
    name: str,
    trainable,
    param_space: dict,
    tune_config,
    phase: str,
    total: int,
    restart_errored: bool,
    setup: Mapping[str, Any],
    stop: dict | None = None,
):
    """Fit a Tune experiment, or resume it where it stopped when its state is already in storage."""
    from ray import tune

    progress = Progress(phase, total, setup)
    callbacks = [progress]

    path = cfg.storage_path.rstrip("/") + "/" + name
    run_config = tune.RunConfig(
        name=name,
        storage_path=cfg.storage_path,
        failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures),
        callbacks=callbacks,
        verbose=0,
        stop=stop,
    )
    if tune.Tuner.can_restore(path):
        log.info("resuming %s from %s", name, path)
        check_experiment_state(path)  # Tune unpickles the state below: refuse one that holds code
        tuner = tune.Tuner.restore(
            path, trainable=trainable, resume_unfinished=True, restart_errored=restart_errored
        )
    else:
        tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)
    # vallex prints one line per trial; Tune's own tables and its "Trials did not complete" error (about
    # trials already reported as FAILED, and recorded in trials.csv) would only repeat it.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    tune_logger = logging.getLogger("ray.tune.tune")
    level = tune_logger.level
    tune_logger.setLevel(logging.CRITICAL)
    _ACTIVE.pop(phase, None)
    try:
        results = tuner.fit()
    finally:
        tune_logger.setLevel(level)
    progress = _ACTIVE.pop(phase, progress)
    if progress.concluded < total:
        raise SearchInterrupted(
            f"the {phase} runs stopped with {total - progress.concluded} of {total} trials unfinished; "
            f"their state is saved in {path}: run the same command again to resume"
        )
    return results


def warn_late_rungs(max_steps: int, eval_every: int, grace: int, reduction: int = 3) -> list[int]:
    """ASHA judges a trial at its first report at or after each rung (grace x 3^k < max_steps + 1). When
    that report is the trial's last step, a stop kills the trial's driver before it writes its own
    report.json and model.pt (its metrics still count). Returns such rungs, after warning about them."""
    evals = {1, *range(eval_every, max_steps, eval_every)}
    late, rung = [], grace
    while rung < max_steps + 1:
        if not any(rung <= e < max_steps for e in evals):
            late.append(rung)
        rung *= reduction
    if late:
        log.warning(
            "WARNING: ASHA compares trials at step(s) %s, where the next evaluation is the last step %d: a trial "
            "stopped there keeps its figures but not its report.json/model.pt; lower tune.eval_every or "
            "tune.grace_steps to avoid it",
            late,
            max_steps,
        )
    return late


def _random_searcher(seed: int):
    """Random draws from the space, seeded. A legacy ``RandomState``, not an int: Tune turns an int into
    a PCG64 ``Generator``, whose pickle (in the saved state) holds globals the resume check refuses."""
    import numpy as np
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=np.random.RandomState(seed))


def run_search(cfg: Config, trial_fn: Callable[..., None] | None = None, reuse_actors: bool = False) -> dict:
    """Run (or resume) the whole search; returns the contents of best_weights.json.

    ``trial_fn(config, setup)`` runs one trial and reports to Tune (default :func:`train_trial`,
    a real training run); it must report ``step`` and ``<tune.metric>/<lang>``, and for search
    trials what :func:`trial_objective` asks :func:`score` for. ``reuse_actors`` runs the next trial
    in the same process: only for a ``trial_fn`` that returns as soon as Tune stops it (one that
    calls ``tune.report`` itself), never for :func:`train_trial`, whose ``fit()`` would keep running.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    t = cfg.tune
    setup = make_setup(cfg)
    languages = setup["languages"]
    out_dir = Path(setup["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    concurrency = trial_concurrency(cfg)
    trainable = tune.with_resources(
        tune.with_parameters(trial_fn or train_trial, setup=setup), {"CPU": DRIVER_CPU}
    )
    log.info(
        "tuning the weights of %s: %d search trials + %d fixed runs%s, %d steps each, "
        "%d trial(s) at once, objective %s",
        ", ".join(f"{lang} ({setup['counts'][lang]} utt)" for lang in languages),
        t.num_samples,
        len(setup["fixed"]),
        f" ({', '.join(setup['fixed'])})" if setup["fixed"] else "",
        t.max_steps_per_trial,
        concurrency,
        t.objective,
    )
    t0 = time.time()

    # 1. Fixed runs: baselines and per-language reference runs.
    rows: list[dict] = []
    if setup["fixed"]:
        results = _run_experiment(
            cfg,
            f"{cfg.run.name}-tune-fixed",
            trainable,
            {"run": tune.grid_search(list(setup["fixed"]))},
            tune.TuneConfig(max_concurrent_trials=concurrency, reuse_actors=reuse_actors),
            FIXED,
            len(setup["fixed"]),
            restart_errored=True,  # a reference run is needed: a rerun retries the failed ones
            setup=setup,
        )
        rows += [_row(r, FIXED, setup) for r in results]
    if setup["reference"] is None and t.objective == "normalized_max":
        setup["reference"] = _solo_reference(rows, languages, t.metric)
        log.info(
            "reference losses (solo runs): %s",
            " ".join(f"{lang} {v:.3f}" for lang, v in setup["reference"].items()),
        )
    objective_kwargs = {**setup["objective"], "reference": setup["reference"]}
    for row in rows:
        if row["status"] == "COMPLETE":
            row.update(score(_valid(row["losses"]), **objective_kwargs))

    # 2. The search.
    names = spaces.tune_space(t.space, languages)
    baseline_rows = [r for r in rows if not r["name"].startswith(SOLO_PREFIX) and "objective" in r]
    pbt = t.scheduler == "pbt"
    if pbt:  # PBT refuses a model-based searcher: the population is drawn uniformly from the space
        if t.search != "random":
            log.info(
                "tune.scheduler=pbt draws its population at random: tune.search=%s is not used", t.search
            )
        searcher = _random_searcher(cfg.run.seed)
    elif t.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.disable_default_handler()  # its records still reach the log file through the root
        optuna.logging.enable_propagation()

        points, rewards = [], []
        for r in baseline_rows:
            p = spaces.to_params(t.space, r["weights"], languages, t.min_weight)
            if p is not None and math.isfinite(r["objective"]):
                points.append(p)
                rewards.append(r["objective"])
        searcher = OptunaSearch(
            seed=cfg.run.seed, points_to_evaluate=points or None, evaluated_rewards=rewards or None
        )
    else:
        searcher = _random_searcher(cfg.run.seed)
    if t.scheduler == "asha":
        warn_late_rungs(
            t.max_steps_per_trial, t.eval_every, t.grace_steps or max(1, t.max_steps_per_trial // 2)
        )
        scheduler = ASHAScheduler(
            time_attr="step",
            # One past the last step: a trial that reaches it ends by itself (its driver writes the run's
            # report) instead of being stopped by ASHA at the last report, before fit() returns.
            max_t=t.max_steps_per_trial + 1,
            grace_period=t.grace_steps or max(1, t.max_steps_per_trial // 2),
            reduction_factor=3,
        )
    elif pbt:
        scheduler = pbts.scheduler(cfg, setup)
        random.seed(cfg.run.seed)  # Tune's PBT picks which better trial to clone with `random`
    else:
        scheduler = FIFOScheduler()
    setup_search = dict(setup)  # the solo references are known now: the search's workers score with them
    trainable = tune.with_resources(
        tune.with_parameters(trial_fn or (pbts.pbt_trial if pbt else train_trial), setup=setup_search),
        {"CPU": DRIVER_CPU},
    )
    results = _run_experiment(
        cfg,
        f"{cfg.run.name}-tune-{'pbt' if pbt else 'search'}",
        trainable,
        names,
        tune.TuneConfig(
            metric="objective",
            mode="min",
            num_samples=t.num_samples,
            max_concurrent_trials=concurrency,
            search_alg=searcher,
            scheduler=scheduler,
            reuse_actors=reuse_actors,
        ),
        SEARCH,
        t.num_samples,
        restart_errored=False,  # a failed trial stays recorded as failed
        setup=setup_search,
        # PBT must not clone into a trial at its last report: it would restart it with nothing to train.
        stop={"step": t.max_steps_per_trial} if pbt else None,
    )
    rows += [_row(r, SEARCH, setup) for r in results]

    summary = write_outputs(cfg, setup, rows, objective_kwargs)
    log.info(
        "best weights (%s, objective %.4f): %s; wrote %s, %s, %s in %.0f s",
        summary["name"],
        summary["objective"]["value"],
        " ".join(f"{lang}={w:.3f}" for lang, w in summary["weights"].items()),
        out_dir / BEST_FILE,
        out_dir / TRIALS_FILE,
        out_dir / PLOT_FILE,
        time.time() - t0,
    )
    return summary


# ---------------------------------------------------------------------------------------------------
# Results -> rows -> files.


def _valid(losses: Mapping[str, Mapping[str, float | None]]) -> dict[str, dict[str, float | None]]:
    return {lang: dict(v) for lang, v in losses.items()}


def _row(result, phase: str, setup: Mapping[str, Any]) -> dict:
    """One trial's result as a plain row: weights, last per-language losses, status."""
    config = result.config or {}
    metrics = result.metrics or {}
    weights = trial_weights(config, setup) if config else {}
    losses = {}
    for lang in setup["languages"]:
        v = {k: metrics.get(f"{k}/{lang}") for k in ("loss", "ar_loss", "nar_loss")}
        if any(x is not None for x in v.values()):
            losses[lang] = v
    step = metrics.get("step")
    if result.error is not None:
        status = "ERROR"
    elif step == setup["max_steps"]:
        status = "COMPLETE"
    else:
        status = "STOPPED"  # by ASHA (or an interrupted run)
    row = {
        "phase": phase,
        "name": config.get("run", metrics.get("trial_id", "")),
        "trial_id": metrics.get("trial_id") or Path(result.path).name,
        "status": status,
        "step": step,
        "weights": weights,
        "losses": losses,
        "error": _error_text(result.error) if result.error is not None else "",
    }
    for key in ("objective", "objective_tiebreak"):
        if key in metrics and phase == SEARCH:
            row[key] = float(metrics[key])
    if setup.get("pbt_interval") and phase == SEARCH:  # a PBT trial: its weight schedule and model
        row["pbt"] = pbts.schedule_of(result) or {}
    return row


def _error_text(error: BaseException) -> str:
    """A one-line error for trials.csv: the original exception, not Ray's wrapper, without colour codes."""
    cause = getattr(error, "cause", None) or error
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(cause))
    return f"{type(cause).__name__}: {' '.join(text.split())[:500]}"


def _solo_reference(rows: list[dict], languages: list[str], metric: str) -> dict[str, float]:
    ref = {}
    for lang in languages:
        row = next((r for r in rows if r["name"] == SOLO_PREFIX + lang), None)
        value = row["losses"].get(lang, {}).get(metric) if row and row["status"] == "COMPLETE" else None
        if value is None:
            why = row["error"] if row and row["error"] else "it did not finish"
            raise RuntimeError(
                f"the reference run for {lang!r} ({SOLO_PREFIX}{lang}) has no final {metric}: {why}. "
                "Run the same command again to retry it (the search resumes), or give tune.reference "
                "as a map or a report.json"
            )
        ref[lang] = float(value)
    return ref


def write_outputs(cfg: Config, setup: Mapping[str, Any], rows: list[dict], objective_kwargs: dict) -> dict:
    """best_weights.json, trials.csv and the PNG; returns best_weights.json's contents."""
    t = cfg.tune
    out_dir = Path(setup["out_dir"])
    languages = setup["languages"]
    metric = t.metric
    candidates = [
        r
        for r in rows
        if r["status"] == "COMPLETE" and "objective" in r and not r["name"].startswith(SOLO_PREFIX)
    ]
    _write_csv(out_dir / TRIALS_FILE, rows, languages, metric)  # also (above all) when every trial failed
    best = pick_best(candidates, t.tie_tolerance)
    if best is None:
        failed = [f"{r['name']}: {r['error']}" for r in rows if r["error"]][:3]
        raise RuntimeError(
            f"no trial finished its {setup['max_steps']} steps with a finite objective; "
            f"see {out_dir / TRIALS_FILE}" + (f"; errors: {failed}" if failed else "")
        )

    def brief(r: dict) -> dict:
        return {
            "weights": r["weights"],
            "objective": r.get("objective"),
            "objective_tiebreak": r.get("objective_tiebreak"),
            "losses": {lang: v.get(metric) for lang, v in r["losses"].items()},
            "status": r["status"],
        }

    summary = {
        # data.weights reads "weights" (vallex.data.weights); the rest documents where they came from.
        "weights": best["weights"],
        "source": "baseline" if best["phase"] == FIXED else "search",
        "name": best["name"],
        "trial_id": best["trial_id"],
        "objective": {
            "kind": t.objective,
            "value": best["objective"],
            "tiebreak": best.get("objective_tiebreak"),
            "metric": metric,
            "normalize": t.normalize if t.objective == "normalized_max" else None,
            "reference": objective_kwargs.get("reference"),
            "tie_tolerance": t.tie_tolerance,
        },
        "losses": {lang: v.get(metric) for lang, v in best["losses"].items()},
        "steps_per_trial": setup["max_steps"],
        "train_counts": setup["counts"],
        "baselines": {r["name"]: brief(r) for r in rows if r["phase"] == FIXED and r["name"] in t.baselines},
        "search": {
            "trials": sum(r["phase"] == SEARCH for r in rows),
            "complete": sum(r["phase"] == SEARCH and r["status"] == "COMPLETE" for r in rows),
            "stopped_early": sum(r["phase"] == SEARCH and r["status"] == "STOPPED" for r in rows),
            "failed": sum(r["phase"] == SEARCH and r["status"] == "ERROR" for r in rows),
            "space": t.space,
            "algorithm": t.search,
            "scheduler": t.scheduler,
        },
    }
    if t.scheduler == "pbt":
        population = pbts.write_schedules(out_dir, [r for r in rows if r["phase"] == SEARCH])
        summary["search"].update(
            algorithm="random", exploits=population["exploits"], interval=pbts.interval(t)
        )
        if "pbt" in best:  # the weights changed during the run: the schedule that made the model, and it
            summary["schedule"] = best["pbt"].get("schedule", [])
            summary["model"] = best["pbt"].get("model")
    write_text(out_dir / BEST_FILE, json.dumps(summary, indent=2))
    try:
        plot_trials(
            rows,
            languages,
            metric,
            out_dir / PLOT_FILE,
            reference=objective_kwargs.get("reference") if t.objective == "normalized_max" else None,
            normalize=t.normalize,
        )
    except Exception as e:  # a figure must never lose the search's result
        log.warning("could not draw %s: %s", out_dir / PLOT_FILE, e)
    return summary


def _write_csv(path: Path, rows: list[dict], languages: list[str], metric: str) -> None:
    header = ["phase", "name", "trial_id", "status", "step", "objective", "objective_tiebreak"]
    header += [f"w/{lang}" for lang in languages] + [f"{metric}/{lang}" for lang in languages] + ["error"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    for r in rows:
        writer.writerow(
            [r["phase"], r["name"], r["trial_id"], r["status"], r["step"]]
            + [r.get("objective", ""), r.get("objective_tiebreak", "")]
            + [r["weights"].get(lang, "") for lang in languages]
            + [r["losses"].get(lang, {}).get(metric, "") for lang in languages]
            + [r["error"]]
        )
    write_text(path, buf.getvalue())


def plot_trials(
    rows: list[dict],
    languages: list[str],
    metric: str,
    path: Path,
    top: int = 3,
    reference: Mapping[str, float] | None = None,
    normalize: str = "excess",
) -> None:
    """Grouped bars per language for each baseline and the best search trials: the raw loss, and (with
    a reference) the normalized loss the objective compares, where the balance shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fixed = [r for r in rows if r["phase"] == FIXED and r["status"] == "COMPLETE"]
    searched = sorted(
        (r for r in rows if r["phase"] == SEARCH and r["status"] == "COMPLETE" and "objective" in r),
        key=lambda r: r["objective"],
    )[:top]
    shown = [r for r in fixed if not r["name"].startswith(SOLO_PREFIX)] + searched
    if not shown:
        return
    panels = [("raw", f"validation {metric}")]
    if reference:
        panels.append(("norm", f"{metric} - reference" if normalize == "excess" else f"{metric} / reference"))
    x = np.arange(len(languages))
    width = 0.8 / len(shown)
    fig, axes = plt.subplots(
        1, len(panels), figsize=(len(panels) * max(5, 1.4 * len(languages) + 0.5 * len(shown)), 4.5)
    )
    axes = np.atleast_1d(axes)
    for ax, (kind, ylabel) in zip(axes, panels, strict=True):
        values_all = []
        for i, r in enumerate(shown):
            label = r["name"] if r["phase"] == FIXED else f"trial {r['trial_id']}"
            if "objective" in r:
                label += f" (obj {r['objective']:.4g})"
            values = []
            for lang in languages:
                v = r["losses"].get(lang, {}).get(metric)
                if v is not None and kind == "norm":
                    v = v - reference[lang] if normalize == "excess" else v / reference[lang]
                values.append(np.nan if v is None else v)
            values_all += [v for v in values if np.isfinite(v)]
            ax.bar(
                x + (i - (len(shown) - 1) / 2) * width,
                values,
                width,
                label=label,
                hatch="" if r["phase"] == FIXED else "//",
            )
        if kind == "raw":
            for j, lang in enumerate(languages):
                if reference and lang in reference:
                    ax.hlines(
                        reference[lang],
                        j - 0.45,
                        j + 0.45,
                        colors="k",
                        linestyles="--",
                        label="reference" if j == 0 else None,
                    )
            if values_all:
                ax.set_ylim(bottom=max(0.0, min(values_all) * 0.9))
            ax.set_title("validation loss (baselines plain, best trials hatched)")
        else:
            ax.set_title("normalized: what the objective's max compares")
        ax.set_xticks(x, languages)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)
