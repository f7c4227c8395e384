"""The training driver: resolve data and weights, build the Ray Train ``TorchTrainer``, fit, report.

It runs on the Ray driver (a laptop, the head node, or a ``ray job submit`` entrypoint) and never
touches tensors itself: workers run :func:`vallex.train.loop.train_loop_per_worker`.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path

from vallex.config import Config, save_config
from vallex.files import is_uri, join, list_names, write_text
from vallex.locks import locked
from vallex.storage import check_storage
from vallex.train.guard import ForgettingGuard, baseline_losses, describe_trips
from vallex.train.metrics import (
    build_report,
    format_record,
    loss_table,
    online_history,
    plot_losses,
    plot_online_weights,
    read_metrics,
    sink_on_this_node,
    strict_json,
)
from vallex.train.plan import RunPlan, initial_state, plan_and_initial_state
from vallex.train.tracking import tracking_settings

log = logging.getLogger("vallex.train")


class NonFiniteLossError(RuntimeError):
    """A loss became NaN/inf: the run stopped at that evaluation (report.json says where)."""


def guard_summary(records: list[dict], cfg: Config) -> dict:
    """The forgetting guard's verdict for report.json: every trip, the final state, whether it stopped."""
    trips = [
        {"step": r["step"], "languages": ForgettingGuard.tripped(r["guard"])}
        for r in records
        if ForgettingGuard.tripped(r.get("guard", {}))
    ]
    return {
        "action": cfg.train.guard.action,
        "metric": cfg.train.guard.metric,
        "max_rise": cfg.train.guard.max_rise,
        "per_language": cfg.train.guard.per_language,
        "baseline": cfg.train.guard.baseline
        or (f"step-0 losses of {cfg.train.init_from}" if cfg.train.init_from else None),
        "trips": trips,
        "final": records[-1].get("guard", {}) if records else {},
        "stopped": bool(records and records[-1].get("stopped_by_guard")),
        "verdict": "forgetting" if trips else "ok",
    }


def write_model_file(weights_path: Path, out: Path, corpus, plan: RunPlan) -> None:
    """The consolidated fp32 weights as a self-describing vallex checkpoint (config, languages in id
    order, the phoneme symbol table): what ray_jobs/synthesize.py and add-language load."""
    import torch

    from vallex.model.checkpoint import load_weights, save_checkpoint
    from vallex.model.vallex import VallexConfig, VallexModel

    model = VallexModel(VallexConfig(**plan.model_config))
    load_weights(model, torch.load(weights_path, weights_only=True), str(weights_path))
    save_checkpoint(
        model,
        out,
        languages=list(plan.model_languages),
        symbols=corpus.symbols,
        symbols_version=int(corpus.manifest["symbols_version"]),
        size=plan.size,
    )


def check_keep_best_by(
    metric: str, eval_languages: list[str], with_objective: bool, train_stage: str
) -> None:
    """train.keep_best_by must name a metric every checkpoint reports (see metrics.flat_metrics): a
    stage this run does not train reports no loss."""
    if not metric:
        return
    known = ["loss_mean", "loss_max", "train_loss", *(["objective"] if with_objective else [])]
    kinds = {"both": ("loss", "ar_loss", "nar_loss"), "ar": ("loss", "ar_loss"), "nar": ("loss", "nar_loss")}
    known += [f"{k}/{lang}" for lang in eval_languages for k in kinds[train_stage]]
    if metric not in known:
        raise ValueError(
            f"train.keep_best_by: {metric!r} is not a reported metric; choose one of {', '.join(known)}"
        )


def room_for_data(node_cpus: list[float], workers: int, per_worker: float, strategy: str) -> bool:
    """Whether ``workers`` training workers of ``per_worker`` CPUs can be placed on nodes with
    ``node_cpus`` CPUs so that some node still has a whole CPU for Ray Data's read tasks (a task needs
    its CPU on one node: half a CPU free on each of two nodes is not room). STRICT_SPREAD puts at most
    one worker per node; the other strategies may put several on a node."""
    eps = 1e-9
    for keep in range(len(node_cpus)):  # the node that keeps a CPU for Ray Data
        caps = [c - (1.0 if n == keep else 0.0) for n, c in enumerate(node_cpus)]
        if caps[keep] < -eps:
            continue
        if strategy == "STRICT_SPREAD":
            slots = sum(1 for c in caps if c + eps >= per_worker)
        else:
            slots = sum(int((c + eps) // per_worker) for c in caps if c > 0)
        if slots >= workers:
            return True
    return False


def check_cluster_fits(cfg: Config) -> None:
    """Fail fast instead of hanging when training would leave no node a CPU for Ray Data's read tasks."""
    import os

    import ray

    workers = cfg.train.min_workers or cfg.train.num_workers
    per_worker = cfg.train.cpus_per_worker
    nodes = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    if room_for_data(nodes, workers, per_worker, cfg.train.placement_strategy):
        return
    total = sum(nodes)
    reserved = workers * per_worker
    if total - reserved >= 1.0:  # enough CPUs in all, but split so that no node keeps a whole one
        msg = (
            f"{workers} workers x train.cpus_per_worker={per_worker:g} with train.placement_strategy="
            f"{cfg.train.placement_strategy} on nodes of {', '.join(f'{c:g}' for c in nodes)} CPUs leave no "
            "node a whole free CPU for Ray Data's read tasks, so the run would wait forever; lower "
            "train.cpus_per_worker, use another placement_strategy, or add a node"
        )
    else:
        msg = (
            f"training reserves train.num_workers x train.cpus_per_worker = {reserved:g} of the cluster's "
            f"{total:g} CPUs, leaving less than 1 for Ray Data to read and mix the training stream, so the "
            f"run would wait forever; lower train.cpus_per_worker (e.g. train.cpus_per_worker="
            f"{max(0.25, (total - 1) / cfg.train.num_workers):g}) or train.num_workers, or add CPUs"
        )
    if os.environ.get("RAY_ADDRESS"):  # a cluster that may autoscale: say it, don't refuse
        log.warning("WARNING: %s", msg)
    else:
        raise ValueError(msg)


def _ingest_options():
    """Train's default ingest options, with the mixed stream's row order kept (same seed, same stream)."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    options.verbose_progress = False
    return options


def show_record(rec: dict, max_steps: int) -> None:
    """One line per evaluation; a loud extra line when the forgetting guard trips."""
    if "note" in rec:  # from the metrics sink (e.g. what a restart cut from metrics.jsonl)
        log.warning("%s", rec["note"])
        return
    log.info(format_record(rec, max_steps))
    if rec.get("stopped_nonfinite"):
        log.error("STOPPED: %s", rec["stopped_nonfinite"])
    if ForgettingGuard.tripped(rec.get("guard", {})):
        log.warning("FORGETTING GUARD at step %d: %s", rec["step"], describe_trips(rec["guard"]))
        if rec.get("stopped_by_guard"):
            log.warning(
                "stopping the run (train.guard.action=stop); the last checkpoint holds step %d", rec["step"]
            )


# The longest the driver stays silent during fit: while the workers start (no evaluation yet), and
# between evaluations (steady training; train.eval_every sets how often a line comes anyway).
STARTUP_HEARTBEAT_S, TRAINING_HEARTBEAT_S = 15.0, 60.0


def _poll(sink, max_steps: int, stop: threading.Event) -> None:
    """Print each evaluation record as rank 0 sends it (runs in a driver thread during fit), and a line
    when nothing was shown for a while: starting the workers (DeepSpeed set-up, the first Ray Data
    read) or a long stretch between evaluations must not look like a hang."""
    import ray

    t0 = shown = evaluated = time.time()
    last_step = None
    while not stop.is_set():
        try:
            for rec in ray.get(sink.drain.remote(), timeout=10):
                show_record(rec, max_steps)
                shown = evaluated = time.time()
                last_step = rec.get("step", last_step)
        except Exception as e:  # the sink is best-effort display; the file is the record
            log.debug("metrics poll failed: %s", e)
        now = time.time()
        if now - shown >= (STARTUP_HEARTBEAT_S if last_step is None else TRAINING_HEARTBEAT_S):
            if last_step is None:
                log.info(
                    "starting the Train workers (DeepSpeed set-up, first data read) before the first "
                    "evaluation: %.0f s so far",
                    now - t0,
                )
            else:
                log.info("training on; last evaluation at step %s, %.0f s ago", last_step, now - evaluated)
            shown = now
        stop.wait(1.0)


def _location(path: str, storage: str) -> str:
    """A checkpoint's path as Ray Train gives it (inside the storage's filesystem: no scheme), as a
    location a user can open: a URI when ``storage`` is one."""
    return f"{storage.split('://', 1)[0]}://{path}" if is_uri(storage) else path


def _best_checkpoint(result, metric: str, storage: str) -> dict | None:
    """The kept checkpoint with the lowest ``metric`` (with a model.pt): checkpoint, step, value, path."""
    scored = [
        (m[metric], m["step"], c)
        for c, m in (result.best_checkpoints or [])
        if metric in m and c is not None and math.isfinite(m[metric])
    ]
    if not scored:
        return None
    value, step, ckpt = min(scored, key=lambda t: (t[0], -t[1]))
    with ckpt.as_directory() as d:
        if not (Path(d) / "model.pt").exists():
            return None
    return {
        "checkpoint": ckpt,
        "step": step,
        "value": value,
        "metric": metric,
        "path": _location(ckpt.path, storage),
    }


# One run per run.name at a time: a second driver is refused, naming the first (see vallex.locks).
@locked(lambda cfg, **_: cfg.train_dir, lambda cfg, **_: f"training run {cfg.run.name!r}")
# And one per Ray Train run folder: two runs of one run.name with different run.output_dir but one
# train.storage_path would resume from, and write, each other's checkpoints.
@locked(
    lambda cfg, **_: join(cfg.storage_path, cfg.run.name),
    lambda cfg, **_: f"training run {cfg.run.name!r} (its Ray Train checkpoints)",
)
def train(
    cfg: Config,
    *,
    callbacks=(),
    objective: Callable[[dict], dict] | None = None,
    plan: RunPlan | None = None,
    start_checkpoint=None,
) -> dict:
    """Run (or resume) training as configured; returns the report (also written to train_dir/report.json).

    ``plan``: the run's :class:`~vallex.train.plan.RunPlan` when the caller built it (a Tune trial, an
    entry point that checks it before starting Ray); else it is built from ``cfg`` here.
    ``callbacks``: extra Ray Train callbacks (Tune passes its ``TuneReportCallback``). ``objective``:
    a picklable function of the per-language validation losses returning extra metrics (Tune passes
    :func:`vallex.tune.objective.score` with its arguments), computed by the workers at every
    evaluation and reported with the metrics (what a Tune search minimizes). ``start_checkpoint``: a
    ``ray.train.Checkpoint`` of another run (same model and workers) this run continues from, steps
    included, when its own storage has none yet (a PBT segment: :mod:`vallex.tune.pbt`).

    Phases: plan -> checks and run files -> the workers' inputs -> fit (with live progress) -> report.
    """
    from vallex.data.corpus import PreparedCorpus

    if plan is None:
        corpus = PreparedCorpus.open(cfg.prepared_dir)
        plan, init_state = plan_and_initial_state(cfg, corpus=corpus)
    else:
        corpus = PreparedCorpus.open(plan.prepared_dir)
        init_state = initial_state(cfg, plan, corpus)
    check_cluster_fits(cfg)
    check_storage(cfg)
    _start_run_files(cfg, plan, objective)
    trainer, sink, intelligibility_report = _build_trainer(
        cfg, plan, corpus, init_state, callbacks, objective, start_checkpoint
    )
    t0 = time.time()
    result = _fit_with_progress(trainer, sink, cfg.train.max_steps)
    report = _finish(cfg, plan, corpus, result, intelligibility_report, time.time() - t0)
    if report["stopped_nonfinite"]:
        raise NonFiniteLossError(
            f"training stopped at {report['stopped_nonfinite']}; report: {cfg.train_dir / 'report.json'}"
        )
    return report


def _start_run_files(cfg: Config, plan: RunPlan, objective) -> None:
    """Check what needs the plan, then write config.yaml and weights.json and say what is trained."""
    check_keep_best_by(
        cfg.train.keep_best_by, list(plan.eval_languages), objective is not None, cfg.train.train_stage
    )
    train_dir = cfg.train_dir
    train_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, train_dir / "config.yaml")
    # With data.weights=online these are the prior; the weights each stretch drew are in metrics.jsonl.
    online = {"online": plan.online} if plan.online is not None else {}
    write_text(
        train_dir / "weights.json",
        json.dumps({"weights": plan.weights, "counts": plan.counts, **online}, indent=2),
    )
    log.info("%s", plan.summary())


def _build_trainer(
    cfg: Config, plan: RunPlan, corpus, init_state, callbacks, objective, start_checkpoint=None
):
    """The mixed training stream, what every worker reads, the metrics sink, and the ``TorchTrainer``;
    returns ``(trainer, sink, intelligibility_report)``."""
    import ray

    from vallex.eval.intelligibility import driver_setup

    guard_baseline = (
        baseline_losses(cfg.train.guard.baseline, cfg.train.guard.metric)
        if cfg.train.guard.baseline
        else None
    )
    train_ds, valid_ref, plan_tables = _datasets(cfg, plan, corpus)
    intelligibility, intelligibility_report = driver_setup(cfg, corpus, plan_tables)
    init_ref = ray.put(init_state) if init_state is not None else None
    sink = _metrics_sink(cfg, plan, corpus)
    if not cfg.train.use_gpu:  # DeepSpeed's CPU op: built here, said out loud, not silently in each worker
        from vallex.train.comm_op import ensure_built

        ensure_built()
    loop_config = {
        "config": cfg.to_dict(),
        "plan": plan,
        "valid_ref": valid_ref,
        "sink": sink,
        "guard_baseline": guard_baseline,
        "init_state": init_ref,
        "objective": objective,
        "tracking": tracking_settings(cfg),
        "intelligibility": intelligibility,
    }
    if start_checkpoint is not None:  # Ray Train V2 has no resume_from_checkpoint: the loop takes it
        loop_config["start_checkpoint"] = start_checkpoint
    if plan.online is not None:  # data.weights=online: each worker reads its own rows of every stretch
        loop_config["online_base"] = ray.put(_online_base(cfg, plan, corpus))
    return _torch_trainer(cfg, plan, train_ds, loop_config, callbacks), sink, intelligibility_report


def _datasets(cfg: Config, plan: RunPlan, corpus):
    """``(mixed training stream, validation shard paths, the driver's light validation columns)``."""
    from vallex.data.batching import stream_rows
    from vallex.data.corpus import split_source
    from vallex.data.mixing import build_mixed_dataset

    # Enough mixed rows for the whole run, plus slack for drop_last and uneven worker splits (and, with
    # data.max_tokens, a bucket pool per worker: no rank may run out first; see vallex.data.batching).
    num_rows = stream_rows(
        plan.budget_rows,
        cfg.train.batch_size,
        cfg.train.num_workers,
        cfg.data.max_tokens,
        cfg.data.bucket_rows,
    )
    train_ds = (
        None  # data.weights=online: no driver-built stream (see vallex.train.online_mix)
        if plan.online is not None
        else build_mixed_dataset(
            corpus, plan.weights, num_rows=num_rows, seed=plan.seed, window_rows=cfg.data.window_rows
        )
    )
    # Shard paths only: each worker reads the validation rows itself (vallex.data.corpus.read_split_rows).
    valid_ref = split_source(corpus, list(plan.eval_languages), "valid", plan.valid_max_rows)
    # The driver reads two light columns: which utterances are synthesized, with which prompt.
    cap = plan.valid_max_rows or None
    plan_tables = {
        lang: corpus.read_split(lang, "valid", columns=["utt_id", "speaker"]).slice(0, cap)
        for lang in plan.eval_languages
    }
    return train_ds, valid_ref, plan_tables


def _online_base(cfg: Config, plan: RunPlan, corpus):
    """The language streams every stretch of an online run continues (the languages the prior gives
    rows; the seed and window size of a static run)."""
    from vallex.data.mixing import MixPlan, normalize_weights

    prior = normalize_weights(corpus, plan.weights)
    return MixPlan.build(corpus, prior, num_rows=0, seed=plan.seed, window_rows=cfg.data.window_rows)


def _metrics_sink(cfg: Config, plan: RunPlan, corpus):
    """The driver-side actor rank 0 sends evaluation records to (metrics.jsonl, TensorBoard); a resumed
    run continues its file."""
    train_dir = cfg.train_dir
    run_dir = join(plan.storage_path, cfg.run.name)
    resuming = bool(list_names(run_dir, "checkpoint_*"))
    sink = sink_on_this_node(
        str(train_dir / "metrics.jsonl"),
        truncate=not resuming,
        tensorboard_dir=str(train_dir / "tensorboard"),
        codec=(corpus.codec, plan.prepared_dir),
    )
    if resuming:
        log.info("found checkpoints in %s: resuming", run_dir)
    return sink


def _torch_trainer(cfg: Config, plan: RunPlan, train_ds, loop_config: dict, callbacks):
    """Ray Train's ``TorchTrainer``: the workers, the ingest of the mixed stream, checkpoints, retries."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from vallex.train.loop import train_loop_per_worker

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=(cfg.train.min_workers, cfg.train.num_workers)
            if cfg.train.min_workers
            else cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={
                "CPU": cfg.train.cpus_per_worker,
                **({"GPU": 1} if cfg.train.use_gpu else {}),
                **cfg.train.worker_resources,
            },
            placement_strategy=cfg.train.placement_strategy,
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        datasets={"train": train_ds} if train_ds is not None else {},
        dataset_config=DataConfig(
            datasets_to_split=["train"] if train_ds is not None else [], execution_options=_ingest_options()
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=plan.storage_path,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute=cfg.train.keep_best_by or None,
                checkpoint_score_order="min",
            ),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=list(callbacks),
        ),
    )


def _fit_with_progress(trainer, sink, max_steps: int):
    """``trainer.fit()`` while a driver thread prints each evaluation as it comes; the Ray Train result."""
    import ray

    stop = threading.Event()
    poller = threading.Thread(target=_poll, args=(sink, max_steps, stop), daemon=True)
    poller.start()
    try:
        result = trainer.fit()
    finally:
        stop.set()
        poller.join(timeout=5)
    for rec in ray.get(sink.drain.remote()):
        show_record(rec, max_steps)
    return result


def _export_models(cfg: Config, plan: RunPlan, corpus, result) -> tuple[Path | None, dict | None]:
    """The last checkpoint's weights as train_dir/model.pt and, with train.keep_best_by, the best one's
    as best_model.pt; ``(model_path, best)``."""
    from vallex.train.loop import EXPORT_FILE

    train_dir, storage = cfg.train_dir, plan.storage_path
    model_path = None
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            if (Path(d) / EXPORT_FILE).exists():
                model_path = train_dir / EXPORT_FILE
                write_model_file(Path(d) / EXPORT_FILE, model_path, corpus, plan)
    best = None
    if cfg.train.keep_best_by:
        best = _best_checkpoint(result, cfg.train.keep_best_by, storage)
        if best is not None:
            with best["checkpoint"].as_directory() as d:
                write_model_file(Path(d) / EXPORT_FILE, train_dir / "best_model.pt", corpus, plan)
            log.info(
                "best checkpoint by %s: step %d (%s = %.4f) -> %s",
                cfg.train.keep_best_by,
                best["step"],
                cfg.train.keep_best_by,
                best["value"],
                train_dir / "best_model.pt",
            )
    return model_path, best


def _online_report(plan: RunPlan, records: list[dict]) -> dict:
    """report.json's ``online``: the settings, the reference, and every evaluation's weights (the
    ``weights`` key of the report is then the prior the run started from)."""
    history = online_history(records)
    return {
        "prior": plan.weights,
        **plan.online,
        "history": history,
        "final_weights": history[-1]["weights"] if history else plan.weights,
    }


def _finish(cfg: Config, plan: RunPlan, corpus, result, intelligibility_report: dict, seconds: float) -> dict:
    """Export the models, write report.json and valid_loss.png, log the per-language table; the report."""
    train_dir, storage = cfg.train_dir, plan.storage_path
    records = read_metrics(train_dir / "metrics.jsonl")
    model_path, best = _export_models(cfg, plan, corpus, result)
    report = build_report(
        records,
        {
            "weights": plan.weights,
            "train_counts": plan.counts,
            "model": {
                "size": plan.size,
                "languages": list(plan.model_languages),
                "num_symbols": plan.num_symbols,
            },
            "checkpoint": _location(result.checkpoint.path, storage) if result.checkpoint else None,
            "best_checkpoint": {k: v for k, v in best.items() if k != "checkpoint"} if best else None,
            "model_file": str(model_path) if model_path else None,
            "wall_seconds": seconds,
            "num_workers": cfg.train.num_workers,
            "zero_stage": cfg.train.zero_stage,
            "init_from": plan.init_from or None,
            **({"init_bridge": plan.init_bridge} if plan.init_bridge is not None else {}),
            "trained_languages": list(plan.languages),
            "intelligibility": intelligibility_report,
            "guard": guard_summary(records, cfg),
            # DeepSpeed skips a step on a loss-scale overflow (fp16): such steps did not train.
            "skipped_steps": records[-1].get("skipped_steps", 0) if records else 0,
            "trained_steps": (records[-1]["step"] - records[-1].get("skipped_steps", 0)) if records else 0,
            "stopped_nonfinite": records[-1].get("stopped_nonfinite") if records else None,
            **({"online": _online_report(plan, records)} if plan.online is not None else {}),
        },
    )
    write_text(train_dir / "report.json", strict_json(report, indent=2))
    plot_losses(records, train_dir / "valid_loss.png")
    if plan.online is not None:
        # The weights the run ended with, readable by data.weights as fixed weights (a "weights" key).
        final = {"weights": report["online"]["final_weights"], "history": report["online"]["history"]}
        write_text(train_dir / "online_weights.json", strict_json(final, indent=2))
        plot_online_weights(records, train_dir / "online_weights.png")
        log.info(
            "online weights: final %s; by stretch in %s",
            " ".join(f"{lang}:{w:.3f}" for lang, w in final["weights"].items()),
            train_dir / "online_weights.png",
        )
    log.info("per language, first vs last evaluation:\n%s", loss_table(records))
    log.info(
        "wrote %s, %s, %s",
        train_dir / "metrics.jsonl",
        train_dir / "report.json",
        train_dir / "valid_loss.png",
    )
    return report
