"""One trial's facts, shared by the static search (:mod:`vallex.tune.search`) and PBT (:mod:`vallex.tune.pbt`):
its weights, the objective its workers score, and its training config."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vallex.config import Config
from vallex.tune import space as spaces


def trial_weights(config: Mapping[str, Any], setup: Mapping[str, Any]) -> dict[str, float]:
    """A trial's sampling weights: a fixed run's (``config["run"]``) or the search point's."""
    if "run" in config:
        return dict(setup["fixed"][config["run"]])
    return spaces.to_weights(
        setup["space"], config, setup["languages"], setup["min_weight"], counts=setup["counts"]
    )


def trial_objective(config: Mapping[str, Any], setup: Mapping[str, Any]) -> dict[str, Any] | None:
    """The :func:`score` keyword arguments a trial's workers use; None for fixed runs (scored later)."""
    if "run" in config:
        return None
    return {**setup["objective"], "reference": setup["reference"]}


def trial_config(setup: Mapping[str, Any], weights: Mapping[str, float], trial_id: str) -> Config:
    """The training config of one trial: its own output dir and Ray Train run, the shared corpus."""
    from vallex.config import config_from_dict, derive_config

    return derive_config(
        config_from_dict(setup["base"]),
        {
            "run.output_dir": str(Path(setup["out_dir"]) / "trials" / trial_id),
            "run.prepared_dir": setup["prepared_dir"],
            "run.name": f"trial-{trial_id}",
            "train.max_steps": setup["max_steps"],
            "train.eval_every": setup["eval_every"],
            "train.checkpoint_every": setup["max_steps"],  # one checkpoint, at the end: trials are short
            "train.storage_path": setup["train_storage"],
            "train.keep_best_by": "",  # a trial keeps its one checkpoint; fixed runs report no objective
            "train.guard.action": "warn",  # the guard must not end a trial early: Tune compares trials
            "data.languages": list(setup["languages"]),
            "data.weights": dict(weights),
        },
    )
