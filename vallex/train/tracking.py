"""Experiment tracking in MLflow and Weights & Biases, through Ray's own integrations (``train.tracking``).

TensorBoard is always written (by the driver's ``MetricsSink``). With ``train.tracking`` set, worker
rank 0 also opens an MLflow run (``ray.air.integrations.mlflow.setup_mlflow``) and/or a W&B run
(``ray.air.integrations.wandb.setup_wandb``), logs the run's config, then at every evaluation the flat
metrics every rank reports to Ray Train (:func:`vallex.train.metrics.flat_metrics`) at that step, and
closes the runs when the loop ends (marked failed when it raises).

The tracker runs' ids travel in the checkpoint's state, so a run restarted by Ray Train, or resumed by
running it again, goes on logging into the same MLflow and W&B runs (when it reaches the same MLflow
store: on several nodes, a tracking server rather than the default SQLite file on rank 0's node).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from vallex.config import Config, mask_url, redact

log = logging.getLogger("vallex.train")

# MLflow's limit on a parameter's value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH).
MAX_PARAM_CHARS = 6000


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 0.001}}`` -> ``{"train.lr": "0.001"}``: MLflow params are strings of at most
    6000 characters (longer values are cut, ending in ``...``)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{prefix}{key}."))
            continue
        text = str(value)
        out[f"{prefix}{key}"] = text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."
    return out


def tracking_settings(cfg: Config) -> dict[str, Any] | None:
    """What the workers need to open the tracker runs, resolved on the driver (absolute paths: a worker's
    working directory is not the driver's); None when ``train.tracking`` is empty."""
    if not cfg.train.tracking:
        return None
    output_dir = cfg.output_dir.resolve()
    # The run's config minus job (its entrypoint and runtime_env are the submitter's business), with
    # every credential masked: it is logged as the runs' params.
    config = {k: v for k, v in redact(cfg.to_dict()).items() if k != "job"}
    return {
        "trackers": list(cfg.train.tracking),
        "project": cfg.train.tracking_project or cfg.run.name,
        "run_name": cfg.run.name,
        "config": config,
        # MLflow 3 refuses a plain-folder (file) store by default; SQLite is its local backend.
        "mlflow_uri": cfg.train.tracking_uri or f"sqlite:///{output_dir / 'mlflow.db'}",
        # Only for the default store: else MLflow puts artifacts under the worker's working directory.
        "mlflow_artifacts": None if cfg.train.tracking_uri else str(output_dir / "mlartifacts"),
        "wandb_dir": str(output_dir / "train"),
        "wandb_mode": cfg.train.wandb_mode,
    }


def _open_mlflow(s: dict[str, Any], run_id: str | None):
    """setup_mlflow: reopen ``run_id`` (it keeps its first params: MLflow refuses to change a logged
    value), or start a new run logging the config; a run the store does not have is replaced, loudly."""
    from mlflow.exceptions import MlflowException
    from ray.air.integrations.mlflow import setup_mlflow

    where = {
        "tracking_uri": s["mlflow_uri"],
        "experiment_name": s["project"],
        "artifact_location": s["mlflow_artifacts"],
        "run_name": s["run_name"],
        "create_experiment_if_not_exists": True,
    }
    inherited = os.environ.pop("MLFLOW_RUN_ID", None)
    if inherited and inherited != run_id:  # e.g. from `mlflow run`: start_run would log into that run
        log.warning(
            "ignoring MLFLOW_RUN_ID=%s from the environment: vallex opens its own MLflow run", inherited
        )
    if run_id:
        os.environ["MLFLOW_RUN_ID"] = run_id  # mlflow.start_run reopens this run
        try:
            return setup_mlflow(**where)
        except MlflowException as e:
            log.warning(
                "cannot reopen MLflow run %s at %s (%s); starting a new run",
                run_id,
                mask_url(s["mlflow_uri"]),
                mask_url(str(e)),
            )
        finally:  # start_run consumes it, but an error before start_run would leave it for the next one
            os.environ.pop("MLFLOW_RUN_ID", None)
    return setup_mlflow(config=flat_params(s["config"]), **where)


class Tracker:
    """Rank 0's MLflow and W&B runs for one worker loop; a no-op on other ranks and without trackers.

    ``with Tracker(settings) as t``: :meth:`open` once the checkpoint state is known, :meth:`log` at
    every evaluation; leaving the block ends the runs (failed if an exception leaves it).
    """

    def __init__(self, settings: dict[str, Any] | None):
        self.settings = settings
        self.mlflow = None  # the mlflow module setup_mlflow returns, with the run active
        self.wandb = None  # the wandb Run setup_wandb returns

    def open(self, rank: int, resume: dict[str, str] | None) -> dict[str, str]:
        """Open (or, with ``resume`` ids from a checkpoint, reopen) the runs on rank 0; returns their ids
        for the checkpoint state."""
        s = self.settings
        if s is None or rank != 0:  # other ranks keep what they loaded: only rank 0 writes the state
            return dict(resume or {})
        resume = resume or {}
        ids = {}
        if "mlflow" in s["trackers"]:
            self.mlflow = _open_mlflow(s, resume.get("mlflow"))
            ids["mlflow"] = self.mlflow.active_run().info.run_id
            log.info(
                "MLflow run %s in experiment %r at %s", ids["mlflow"], s["project"], mask_url(s["mlflow_uri"])
            )
        if "wandb" in s["trackers"]:
            from ray.air.integrations.wandb import setup_wandb

            # Ray reads the mode from the environment: offline must skip its API-key lookup.
            os.environ["WANDB_MODE"] = s["wandb_mode"]
            Path(s["wandb_dir"]).mkdir(parents=True, exist_ok=True)
            self.wandb = setup_wandb(
                config=s["config"],
                project=s["project"],
                name=s["run_name"],
                id=resume.get("wandb"),
                resume="allow" if "wandb" in resume else None,  # None: new, unlike Ray's default
                dir=s["wandb_dir"],
                mode=s["wandb_mode"],
                reinit="finish_previous",  # Ray's default (True) is deprecated in wandb
            )
            # Plotted against the training step: a resumed run re-logs steps after its last checkpoint.
            self.wandb.define_metric("*", step_metric="step")
            ids["wandb"] = self.wandb.id
            log.info(
                "W&B run %s (%s) in project %r, %s",
                self.wandb.id,
                s["wandb_mode"],
                s["project"],
                s["wandb_dir"],
            )
        return ids

    def log(self, metrics: dict[str, float]) -> None:
        """One evaluation's flat metrics (with their ``step``)."""
        if self.mlflow is not None:
            step = int(metrics["step"])
            self.mlflow.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step=step)
        if self.wandb is not None:
            self.wandb.log(metrics)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        failed = exc_type is not None
        if self.mlflow is not None:
            self.mlflow.end_run(status="FAILED" if failed else "FINISHED")
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)
