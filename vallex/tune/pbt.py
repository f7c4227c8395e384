"""Population Based Training over the language weights (``tune.scheduler=pbt``).

A population of ``tune.num_samples`` trials, each a real training run cut into *segments* of
``tune.pbt_interval`` steps. Every trial starts at weights drawn uniformly from ``tune.space``; at the end
of each segment every trial reports its objective with its checkpoint, and Tune's
``PopulationBasedTraining`` (synchronous: scores are compared at the same step) lets the worst
``tune.pbt_quantile`` of the population *exploit* a better trial -- continue from that trial's DeepSpeed
checkpoint, steps, optimizer and counters included -- and *explore*: its weights perturbed on the
simplex (:func:`vallex.tune.space.perturb`). Each trial's result is a weight **schedule** (the weights of
every segment it inherited and trained, with where it cloned from) and a final model.

Ray Train V2 facts this rests on (Ray 2.58):

- ``TuneReportCallback`` forwards a Train run's metrics to Tune but not its checkpoint, so PBT would have
  nothing to clone: the trial reports each segment's final Train checkpoint to Tune itself
  (``tune.report(..., checkpoint=...)``), once the segment's ``fit()`` has returned (no Train worker is
  alive when PBT pauses or clones the trial).
- A ``RunConfig(name=...)`` that already holds checkpoints is resumed automatically: every segment is its
  own Train run (``trial-<id>-seg-<k>``), started from the Tune checkpoint through
  ``train(start_checkpoint=...)`` (V2 has no ``resume_from_checkpoint``).

The segment's rows: the static mixed stream at the segment's weights, with the batches the model already
consumed skipped, as a restarted run does (Ray Data keeps no stream position: the same count, not the
same rows). Each segment's Train run keeps its own ``metrics.jsonl`` / ``report.json`` under
``<run.output_dir>/tune/trials/<trial>/seg-<k>/train/``; the last one's ``model.pt`` is the trial's model.
"""

from __future__ import annotations

import functools
import json
import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray.tune.schedulers import PopulationBasedTraining

from vallex.config import Config
from vallex.tune import space as spaces

log = logging.getLogger("vallex.tune")

META_KEY = "vallex_pbt"  # the Tune checkpoint's metadata (.metadata.json, plain JSON): step, schedule
SEGMENT_PREFIX = "seg-"
SCHEDULES_FILE, SCHEDULE_PLOT = "pbt_schedules.json", "pbt_schedules.png"


def interval(t) -> int:
    """Steps per segment: ``tune.pbt_interval``, or a quarter of the trial (at least 1)."""
    return t.pbt_interval or max(1, t.max_steps_per_trial // 4)


class Explore:
    """PBT's explore step (``custom_explore_fn``): the cloned trial's config with perturbed weights.

    Plain data only, as it is pickled into Tune's experiment state (checked on resume by
    :mod:`vallex.tune.state_check`): the randomness of call ``n`` comes from ``(seed, n)``."""

    def __init__(self, setup: Mapping[str, Any], sigma: float, resample: float, seed: int):
        self.space, self.languages = setup["space"], list(setup["languages"])
        self.min_weight, self.counts = setup["min_weight"], dict(setup["counts"])
        self.sigma, self.resample, self.seed, self.calls = sigma, resample, seed, 0

    def __call__(self, config: dict) -> dict:
        rng = random.Random(self.seed * 1_000_003 + self.calls)
        self.calls += 1
        names = spaces.param_names(self.space, self.languages)
        params, how = spaces.perturb(
            self.space,
            {n: config[n] for n in names},
            self.languages,
            rng,
            sigma=self.sigma,
            resample=self.resample,
            min_weight=self.min_weight,
            counts=self.counts,
        )
        before = spaces.to_weights(self.space, config, self.languages, self.min_weight, self.counts)
        after = spaces.to_weights(self.space, params, self.languages, self.min_weight, self.counts)
        log.info(
            "pbt explore (%s): %s -> %s",
            how,
            " ".join(f"{k}={v:.3f}" for k, v in before.items()),
            " ".join(f"{k}={v:.3f}" for k, v in after.items()),
        )
        return {**config, **params}


class SyncPBT(PopulationBasedTraining):
    """Tune's synchronous PBT, resumable. Tune saves no scheduler state: a resumed experiment gets the
    scheduler as it was built, whose next synchronization point is the first interval, while its trials
    restart at their last step. At the first sync it then sets the next one to the trials' step itself,
    which no trial is below: none is chosen to run, and the search waits forever (seen with Ray 2.58).
    Each restored trial's step, score and result are taken from its last result instead, and the next
    synchronization point follows the slowest trial."""

    def on_trial_add(self, tune_controller, trial):
        super().on_trial_add(tune_controller, trial)
        last = trial.last_result or {}
        step = last.get(self._time_attr)
        if isinstance(step, (int, float)) and step > 0 and self._metric in last:  # a restored trial
            state = self._trial_state[trial]
            state.last_train_time = state.last_perturbation_time = step
            state.last_score = self._metric_op * last[self._metric]
            state.last_result = last
            # (only on a restore: a fresh trial added late is waited for as Tune's PBT does)
            slowest = min(s.last_train_time for s in self._trial_state.values())
            self._next_perturbation_sync = max(self._perturbation_interval, self._burn_in_period) + slowest


def scheduler(cfg: Config, setup: Mapping[str, Any]):
    """Tune's synchronous PBT on the training step, minimizing the objective, exploring with :class:`Explore`."""
    t = cfg.tune
    return SyncPBT(
        time_attr="step",  # metric and mode: the TuneConfig's (objective, min)
        perturbation_interval=interval(t),
        hyperparam_mutations={},  # the weights move together on the simplex: Explore does it
        custom_explore_fn=Explore(setup, t.pbt_sigma, t.pbt_resample, cfg.run.seed),
        quantile_fraction=t.pbt_quantile,
        # Compare trials at the same step (a loss falls with steps: an asynchronous PBT would compare a
        # trial that trained longer with one that trained less), as the paper's Appendix A.1 does.
        synch=True,
        log_config=False,  # the schedules are in each trial's checkpoint and pbt_schedules.json
    )


def segment_config(
    setup: Mapping[str, Any], weights: Mapping[str, float], trial_id: str, segment: str, end: int
):
    """One segment's training config: the trial's, with its own output folder and Train run, to ``end``."""
    from vallex.config import derive_config
    from vallex.tune.trial import trial_config

    return derive_config(
        trial_config(setup, weights, trial_id),
        {
            "run.output_dir": str(Path(setup["out_dir"]) / "trials" / trial_id / segment),
            "run.name": f"trial-{trial_id}-{segment}",  # a new Train run: V2 would resume an old name
            "train.max_steps": end,
            "train.checkpoint_every": end,  # one checkpoint, at the segment's end: what Tune clones
        },
    )


def pbt_trial(config: dict, setup: dict) -> None:
    """One member of the population: segments of real Ray Train + DeepSpeed training, each reported to
    Tune with its checkpoint, continuing from whichever checkpoint Tune restores (its own or, after an
    exploit, a better trial's, with this trial's config now holding the perturbed weights)."""
    from ray import tune
    from ray.data import DataContext

    from vallex.train.metrics import flat_metrics, read_metrics
    from vallex.train.trainer import train
    from vallex.tune.objective import score
    from vallex.tune.trial import trial_objective, trial_weights

    DataContext.get_current().enable_progress_bars = False
    trial_id = tune.get_context().get_trial_id()
    weights = trial_weights(config, setup)
    objective = functools.partial(score, **trial_objective(config, setup))
    every, max_steps = setup["pbt_interval"], setup["max_steps"]
    trial_dir = Path(setup["out_dir"]) / "trials" / trial_id
    checkpoint = tune.get_checkpoint()
    state = checkpoint.get_metadata().get(META_KEY, {}) if checkpoint is not None else {}
    step, schedule = int(state.get("step", 0)), list(state.get("schedule", []))
    cloned_from = state.get("trial_id") if state.get("trial_id") not in (None, trial_id) else None
    while step < max_steps:
        end = min((step // every + 1) * every, max_steps)
        # Numbered by how many this trial ran: after an exploit it may train the same steps again.
        index = len(list(trial_dir.glob(SEGMENT_PREFIX + "*"))) if trial_dir.exists() else 0
        segment = f"{SEGMENT_PREFIX}{index:03d}"
        cfg = segment_config(setup, weights, trial_id, segment, end)
        plan = setup["plan"].with_weights(weights, storage_path=cfg.storage_path)
        report = train(cfg, plan=plan, objective=objective, start_checkpoint=checkpoint)
        if report.get("steps") != end or not report.get("checkpoint"):
            raise RuntimeError(
                f"segment {segment} of trial {trial_id} ended at step {report.get('steps')}, not {end}"
            )
        entry = {
            "trial_id": trial_id,
            "segment": segment,
            "from_step": step,
            "to_step": end,
            "weights": weights,
        }
        if cloned_from:
            entry["cloned_from"] = cloned_from
        schedule.append(entry)
        checkpoint = tune.Checkpoint(report["checkpoint"])
        checkpoint.update_metadata(
            {
                META_KEY: {
                    "trial_id": trial_id,
                    "step": end,
                    "schedule": schedule,
                    "model": report["model_file"],
                }
            }
        )
        record = read_metrics(cfg.train_dir / "metrics.jsonl")[-1]
        metrics = {**flat_metrics(record), **objective(record["valid"]), "segment": index}
        step, cloned_from = end, None
        tune.report(metrics, checkpoint=checkpoint)  # PBT decides here: continue, pause, or clone


# ---------------------------------------------------------------------------------------------------
# Outputs: every trial's schedule.


def schedule_of(result) -> dict | None:
    """A finished trial's schedule, final model and step, from its last Tune checkpoint's metadata."""
    if result.checkpoint is None:
        return None
    return result.checkpoint.get_metadata().get(META_KEY)


def write_schedules(out_dir: Path, rows: list[dict]) -> dict:
    """``pbt_schedules.json`` (every population member: its weights segment by segment, with the trial
    each segment was trained by, the objective and the model) and a PNG of the weights over steps."""
    from vallex.files import write_text

    trials = {
        r["trial_id"]: {
            "status": r["status"],
            "objective": r.get("objective"),
            "final_weights": r["weights"],
            "model": (r.get("pbt") or {}).get("model"),
            "schedule": (r.get("pbt") or {}).get("schedule", []),
        }
        for r in rows
        if "pbt" in r
    }
    # An exploit is one segment that starts from another trial's checkpoint; trials that cloned the
    # cloner inherit its schedule, so the same segment can appear in several schedules.
    exploits = {
        (s["trial_id"], s["from_step"], s["cloned_from"])
        for t in trials.values()
        for s in t["schedule"]
        if s.get("cloned_from")
    }
    out = {"trials": trials, "exploits": len(exploits)}
    write_text(out_dir / SCHEDULES_FILE, json.dumps(out, indent=2))
    try:
        plot_schedules(trials, out_dir / SCHEDULE_PLOT)
    except Exception as e:  # a figure must never lose the search's result
        log.warning("could not draw %s: %s", out_dir / SCHEDULE_PLOT, e)
    return out


def plot_schedules(trials: Mapping[str, dict], path: Path) -> None:
    """One panel per language: each trial's weight over steps (a step line); clones marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vallex.files import save_figure

    languages = sorted({lang for t in trials.values() for s in t["schedule"] for lang in s["weights"]})
    if not languages:
        return
    fig, axes = plt.subplots(1, len(languages), figsize=(4 * len(languages), 3.5), squeeze=False)
    for ax, lang in zip(axes[0], languages, strict=True):
        for trial_id, t in sorted(trials.items()):
            xs, ys = [], []
            for s in t["schedule"]:
                xs += [s["from_step"], s["to_step"]]
                ys += [s["weights"][lang]] * 2
            (line,) = ax.plot(
                xs, ys, label=f"{trial_id} ({t['objective']:.4g})" if t["objective"] else trial_id
            )
            for s in t["schedule"]:
                if s.get("cloned_from"):
                    ax.plot([s["from_step"]], [s["weights"][lang]], "o", color=line.get_color())
        ax.set_title(f"{lang}: weight by step (o = cloned, perturbed)")
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
