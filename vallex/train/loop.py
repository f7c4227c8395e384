"""The per-worker training loop that Ray Train runs on every rank.

``setup -> (resume) -> train steps with periodic per-language validation and checkpoints``.
Everything a worker needs arrives in ``train_loop_config`` (see ``vallex.train.trainer``).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from vallex.config import Config, config_from_dict
from vallex.data.batching import PaddingStats, train_batches, validation_indices
from vallex.data.collate import collate
from vallex.data.corpus import read_split_share
from vallex.data.mixing import MixStats
from vallex.eval.intelligibility import Intelligibility
from vallex.model.checkpoint import load_weights
from vallex.model.vallex import OUTPUT_KEYS, VallexConfig, VallexModel
from vallex.train import engine as ds_engine
from vallex.train.guard import ForgettingGuard
from vallex.train.metrics import flat_metrics
from vallex.train.tracking import Tracker

log = logging.getLogger("vallex.train")

# Per-language sums all-reduced across ranks: the model's per-sample outputs, in its order.
EVAL_FIELDS = OUTPUT_KEYS
STATE_FILE = "vallex_state.json"
EXPORT_FILE = "model.pt"
CHECKPOINT_TAG = "ckpt"


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _validation_batches(
    tables: dict,
    language_ids: dict[str, int],
    num_codebooks: int,
    batch_size: int,
    rank: int,
    world: int,
    max_tokens: int = 0,
) -> dict[str, list[dict[str, torch.Tensor]]]:
    """This rank's slice (every world-th row) of each language's validation table, as collated batches
    (under ``data.max_tokens`` too when set: see vallex.data.batching.validation_indices)."""
    out = {}
    for lang, table in tables.items():
        part = table.take(np.arange(rank, table.num_rows, world))
        rows = {c: part.column(c).to_numpy(zero_copy_only=False) for c in part.column_names}
        out[lang] = [
            collate({c: v[idx] for c, v in rows.items()}, language_ids, num_codebooks)
            for idx in validation_indices(rows, batch_size, max_tokens)
        ]
    return out


def evaluate(
    model_engine,
    valid_batches: dict[str, list],
    languages: list[str],
    device,
    train_stage: str,
    filler: dict[str, torch.Tensor],
) -> dict:
    """All-reduced per-language validation losses and top-10 accuracies.

    Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively inside
    forward); a rank with fewer batches (or none: fewer validation rows than workers) runs ``filler``,
    a real batch whose results are discarded.
    """
    model_engine.eval()
    sums = torch.zeros(len(languages), len(EVAL_FIELDS), dtype=torch.float64, device=device)
    n_local = torch.tensor([sum(len(b) for b in valid_batches.values())], device=device)
    if dist.is_initialized():
        dist.all_reduce(n_local, op=dist.ReduceOp.MAX)
    n_max = int(n_local.item())
    work = [(li, b) for li, lang in enumerate(languages) for b in valid_batches.get(lang, [])]
    with torch.no_grad():
        for i in range(n_max):
            li, batch = work[i] if i < len(work) else (None, filler)
            out = model_engine(_to_device(batch, device), train_stage=train_stage)
            if li is not None:
                sums[li] += torch.stack([out[f].sum().double() for f in EVAL_FIELDS])
    if dist.is_initialized():
        dist.all_reduce(sums)
    model_engine.train()
    result = {}
    for li, lang in enumerate(languages):
        s = dict(zip(EVAL_FIELDS, sums[li].tolist(), strict=True))
        # A stage not run (train.train_stage=ar or nar) scored no tokens: its figures are None, not 0.
        ar = s["ar_loss_sum"] / s["ar_tokens"] if s["ar_tokens"] else None
        nar = s["nar_loss_sum"] / s["nar_tokens"] if s["nar_tokens"] else None
        result[lang] = {
            "ar_loss": ar,
            "nar_loss": nar,
            "loss": (ar or 0.0) + (nar or 0.0),
            "ar_top10": s["ar_top10_correct"] / s["ar_tokens"] if s["ar_tokens"] else None,
            "nar_top10": s["nar_top10_correct"] / s["nar_tokens"] if s["nar_tokens"] else None,
            "ar_tokens": int(s["ar_tokens"]),
            "nar_tokens": int(s["nar_tokens"]),
        }
    return result


def _save_checkpoint(
    model_engine, state: dict, metrics: dict, rank: int, zero_stage: int, export: bool
) -> None:
    """Every rank writes its DeepSpeed shard to a fresh dir, then reports it to Ray Train.

    Ray Train registers the checkpoint only once every rank has reported it, and resumes only from
    registered checkpoints: a checkpoint interrupted half-way is never the one restored. With
    ``export``, rank 0 adds ``model.pt``: the consolidated fp32 weights, for synthesis and export.
    """
    import ray.train

    with tempfile.TemporaryDirectory(prefix="vallex-ckpt-") as tmp:
        model_engine.save_checkpoint(tmp, tag=CHECKPOINT_TAG, client_state={"vallex": state})
        if export:
            weights = consolidated_state_dict(model_engine, zero_stage)
            if rank == 0:
                torch.save(weights, Path(tmp, EXPORT_FILE))
        if rank == 0:
            Path(tmp, STATE_FILE).write_text(json.dumps(state))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def consolidated_state_dict(model_engine, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full fp32 weights on rank 0 (collective under ZeRO-3, where each rank holds a slice)."""
    if zero_stage == 3:
        # Gathers the partitioned parameters; every rank must call it. Returns the dict on rank 0.
        state = model_engine._zero3_consolidated_16bit_state_dict() or {}
    else:
        state = model_engine.module.state_dict()
    return {k: v.detach().float().cpu() for k, v in state.items()}


def global_counts(mix: MixStats, languages: list[str], device) -> dict[str, int]:
    """Rows drawn per language by all ranks together (a collective: every rank calls it)."""
    counts = torch.tensor([float(mix.counts.get(lang, 0)) for lang in languages], device=device)
    if dist.is_initialized():
        dist.all_reduce(counts)
    return {lang: int(c) for lang, c in zip(languages, counts.tolist(), strict=True)}


def languages_per_batch(mix: MixStats, device) -> float:
    """Mean number of languages in a batch, over every rank's batches since this (re)start."""
    t = torch.tensor([mix.mean_languages_per_batch * mix.batches, float(mix.batches)], device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return float(t[0] / t[1]) if t[1] > 0 else 0.0


def padding_fraction(padding: PaddingStats, device) -> float | None:
    """Share of padding in every rank's collated batches since the last evaluation (None: no batch)."""
    t = torch.tensor([float(padding.real), float(padding.padded)], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return float(1 - t[0] / t[1]) if t[1] > 0 else None


def resume(model_engine, ckpt_dir: str, saved_world: int, world: int, zero_stage: int, rank: int) -> None:
    """Load a checkpoint, also when the number of workers changed (elastic training).

    ZeRO partitions optimizer state (stage 1-2) and parameters too (stage 3) by data-parallel rank, so a
    checkpoint only loads whole at the world size that wrote it (bf16 at stage 0 shards its fp32 master
    weights too). At another size, stages 0-2 restart
    from the saved weights with fresh optimizer moments (rank 0's model file holds every weight);
    stage 3 cannot, and says what to do instead.
    """
    if saved_world == world:
        model_engine.load_checkpoint(ckpt_dir, tag=CHECKPOINT_TAG)
    elif zero_stage < 3:
        if rank == 0:
            log.warning(
                "checkpoint was written by %d workers, resuming with %d: weights restored, optimizer "
                "moments reset (ZeRO-%d shards them per worker)",
                saved_world,
                world,
                zero_stage,
            )
        model_engine.load_checkpoint(ckpt_dir, tag=CHECKPOINT_TAG, load_module_only=True)
    else:
        raise RuntimeError(
            f"this ZeRO-3 checkpoint was written by {saved_world} workers and cannot be loaded by {world}: "
            f"resume with train.num_workers={saved_world}, or convert it with DeepSpeed's ds_to_universal.py "
            "and resume from the universal checkpoint, or use train.zero_stage=2 for elastic runs"
        )
    if rank == 0:
        log.info("resumed from a checkpoint written by %d worker(s)", saved_world)


def _finite(x: float | None) -> bool:
    return x is None or math.isfinite(x)


def any_rank(flag: bool, device) -> bool:
    """Whether ``flag`` holds on any rank (a collective: every rank calls it)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def nonfinite_losses(record: dict, train_nonfinite: bool, policy: str) -> str | None:
    """Why the run must stop at this evaluation because a loss is NaN/inf, or None.

    A non-finite training loss (on any rank) always stops: the weights it updated are no longer
    numbers. A non-finite validation loss stops too with ``train.on_nonfinite=stop``; with ``guard`` it
    is a forgetting-guard trip for that language instead (``train.guard.action`` decides)."""
    step = record["step"]
    if train_nonfinite:
        return (
            f"step {step}: the training loss is not a finite number (NaN/inf) on at least one worker; "
            "lower train.lr, keep train.grad_clip > 0, or use train.precision=fp32"
        )
    if policy == "guard":
        return None
    bad = {
        lang: key
        for lang, v in sorted(record["valid"].items())
        for key in ("ar_loss", "nar_loss")
        if v[key] is not None and not math.isfinite(v[key])
    }
    if not bad:
        return None
    return f"step {step}: the validation loss of {', '.join(f'{lang} ({k})' for lang, k in bad.items())} is not a finite number (NaN/inf)"


def train_loop_per_worker(loop_config: dict) -> None:
    with Tracker(loop_config.get("tracking")) as tracker:  # ends the MLflow / W&B runs, failed or not
        _train_loop(loop_config, tracker)


def _train_loop(loop_config: dict, tracker: Tracker) -> None:
    import ray
    import ray.train

    cfg: Config = config_from_dict(loop_config["config"])
    info = loop_config["corpus"]
    languages: list[str] = info["languages"]  # trained (mixed) languages
    eval_languages: list[str] = info.get("eval_languages", languages)
    language_ids: dict[str, int] = info["language_ids"]
    num_codebooks: int = info["num_codebooks"]
    sink = loop_config.get("sink")
    objective = loop_config.get("objective")

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ds_engine.device_for(cfg.train)
    torch.manual_seed(cfg.run.seed)  # identical init on every rank
    if not cfg.train.use_gpu:
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))

    model = VallexModel(VallexConfig(**info["model_config"]))
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and loop_config.get("init_state") is not None:  # train.init_from, grown by the driver
        load_weights(model, ray.get(loop_config["init_state"]), cfg.train.init_from)
    model_engine, _, _ = ds_engine.initialize(model, cfg.train)
    ds_engine.use_weights_only_loads(model_engine)  # a resume must not unpickle code from storage
    # What DeepSpeed actually runs (not what was asked): sent with the first record of each (re)start.
    engine_facts = {
        "zero_stage": model_engine.zero_optimization_stage(),
        "offload_optimizer": model_engine.zero_offload_optimizer() is not None,
        "offload_param": model_engine.zero_offload_param() is not None,
        "bf16": bool(model_engine.bfloat16_enabled()),
        "world_size": world,
    }

    state = {"step": 0, "consumed_batches": 0, "mix": {}, "guard_best": {}, "initial": None}
    if ckpt is not None:
        with ckpt.as_directory() as d:
            ds_engine.check_checkpoint_files(d)  # names a file holding more than weights, before any load
            state = json.loads(Path(d, STATE_FILE).read_text())
            resume(model_engine, d, state.get("world_size", world), world, cfg.train.zero_stage, rank)
    state["world_size"] = world
    state["tracking"] = tracker.open(rank, state.get("tracking"))
    if rank == 0 and sink is not None:  # metrics.jsonl continues this checkpoint's timeline, no other
        note = ray.get(sink.restart_at.remote(state["step"] if ckpt is not None else None))
        if note:
            log.warning("%s", note)

    # Read from the shards here, not gathered on the driver: the validation split up to
    # data.valid_max_rows per language. This rank scores rows rank, rank + world, ...; the whole
    # (capped) split is kept because text gain pairs each row with another one's text and synthesis
    # draws its prompts from any row (vallex.eval.intelligibility).
    valid_tables = read_split_share(loop_config["valid_ref"], 0, 1)
    valid_batches = _validation_batches(
        valid_tables, language_ids, num_codebooks, cfg.train.batch_size, rank, world, cfg.data.max_tokens
    )
    first = next(iter(valid_tables.values())).slice(0, 1)
    filler = _validation_batches({"_": first}, language_ids, num_codebooks, 1, 0, 1)["_"][0]
    # Text gain, PER of synthesized speech, listening samples (vallex.eval.intelligibility).
    intelligibility = Intelligibility(
        cfg, valid_tables, info, rank, world, model_engine.module, loop_config.get("intelligibility")
    )
    mix = MixStats()
    padding = PaddingStats()  # since the last evaluation
    if rank == 0:  # the checkpoint holds the all-ranks counts: one rank restores them, the sum stays right
        mix.counts.update(state["mix"])
    g = cfg.train.guard

    def make_guard(initial: dict | None) -> ForgettingGuard:
        # Reference per language: train.guard.baseline's file, else (init_from) the loss the languages the
        # model already knew had before this run trained it, else the run's own best.
        from_file = loop_config.get("guard_baseline")
        return ForgettingGuard(
            g.max_rise,
            g.per_language,
            from_file or initial,
            g.metric,
            best=state.get("guard_best"),
            source="baseline" if from_file else "initial",
            floor=g.floor,
        )

    guard = make_guard(state.get("initial"))

    def evaluation(step: int, train_loss: float | None, t_window: float, n_window: int) -> dict:
        """Evaluate every language; the record metrics.jsonl keeps (identical on every rank)."""
        valid = evaluate(model_engine, valid_batches, eval_languages, device, cfg.train.train_stage, filler)
        intelligibility.evaluate(model_engine, valid, device, filler, step, sink if rank == 0 else None)
        counts = global_counts(mix, languages, device)
        total = max(sum(counts.values()), 1)
        elapsed = time.perf_counter() - t_window
        return {
            "step": step,
            "train_loss": train_loss,
            "lr": float(model_engine.get_lr()[0]),
            "valid": valid,
            "realized_fractions": {lang: counts[lang] / total for lang in languages},
            "samples_seen": int(sum(counts.values())),
            "languages_per_batch": languages_per_batch(mix, device),
            "padding_fraction": padding_fraction(padding, device),
            "samples_per_s": n_window * world / max(elapsed, 1e-9),
            # Steps DeepSpeed skipped on a loss-scale overflow (fp16): counted, not trained.
            "skipped_steps": int(getattr(model_engine, "skipped_steps", 0) or 0),
            "time": time.time(),
        }

    def publish(record: dict) -> dict:
        """Send the record to the driver's sink (rank 0); the flat metrics every rank reports."""
        if rank == 0 and sink is not None:
            if engine_facts:
                record = {**record, "engine": dict(engine_facts)}
                engine_facts.clear()
            ray.get(sink.log.remote(record))
        metrics = flat_metrics(record)
        if objective:
            from vallex.tune.objective import score

            metrics.update(score(record["valid"], **objective))
        tracker.log(metrics)
        return metrics

    if cfg.train.init_from and ckpt is None:
        # Step 0: where every language stands before this run trains the model (the forgetting baseline).
        record = evaluation(0, None, time.perf_counter(), 0)
        known = set(info.get("init_languages", []))
        state["initial"] = {
            lang: v[g.metric]
            for lang, v in record["valid"].items()
            if lang in known and v.get(g.metric) is not None
        }
        guard = make_guard(state["initial"])
        record["guard"] = guard.check(record["valid"])
        record["stopped_by_guard"] = False
        ray.train.report(publish(record))

    shard = ray.train.get_dataset_shard("train")

    # Ray Data has no mid-stream position: after a resume, skip the batches this rank already used
    # (same count, not necessarily the same rows: see docs in vallex.data.mixing). With data.max_tokens
    # the batch sizes vary, but the batches are a function of the stream, so the same count is skipped.
    stream = train_batches(
        shard,
        batch_size=cfg.train.batch_size,
        max_tokens=cfg.data.max_tokens,
        bucket_rows=cfg.data.bucket_rows,
        shuffle_buffer=cfg.data.shuffle_buffer,
        seed=cfg.run.seed,
        rank=rank,
        skip=state["consumed_batches"],
    )
    step = state["step"]
    t_window, n_window, loss_window = time.perf_counter(), 0, []
    model_engine.train()
    while step < cfg.train.max_steps:
        for _ in range(cfg.train.grad_accum):
            np_batch = next(stream)
            mix.update(np_batch)
            padding.update(np_batch)
            batch = _to_device(collate(np_batch, language_ids, num_codebooks), device)
            out = model_engine(batch, train_stage=cfg.train.train_stage)
            # A token mean over this batch; DeepSpeed weighs every micro-batch alike (1/grad_accum, mean
            # over ranks), whatever its rows: see vallex.data.batching on what data.max_tokens does to that.
            model_engine.backward(out["loss"])
            model_engine.step()
            state["consumed_batches"] += 1
            n_window += len(np_batch["language"])
            loss_window.append(out["loss"].detach())  # no host sync per step; read at evaluation
        step += 1
        state["step"] = step

        last = step == cfg.train.max_steps
        checkpoint = step % cfg.train.checkpoint_every == 0 or last
        # Every checkpoint is evaluated too, so each one carries its metrics (keep-best, Tune).
        if not (step == 1 or step % cfg.train.eval_every == 0 or checkpoint):
            continue
        train_loss = float(torch.stack(loss_window).float().mean()) if loss_window else None
        record = evaluation(step, train_loss, t_window, n_window)
        record["guard"] = guard.check(record["valid"])
        nonfinite = nonfinite_losses(
            record, any_rank(not _finite(train_loss), device), cfg.train.on_nonfinite
        )
        stop = g.action == "stop" and bool(ForgettingGuard.tripped(record["guard"]))
        record["stopped_by_guard"] = stop and not nonfinite
        if nonfinite:
            record["stopped_nonfinite"] = nonfinite
        metrics = publish(record)
        if nonfinite:  # identical on every rank; the weights are no longer numbers: no checkpoint of them
            ray.train.report(metrics)
            return
        t_window, n_window, loss_window = time.perf_counter(), 0, []
        padding.reset()
        if stop or checkpoint:  # the verdict is identical on every rank (all-reduced losses)
            state["mix"], state["guard_best"] = global_counts(mix, languages, device), guard.best
            export = last or stop or bool(cfg.train.keep_best_by)  # keep-best: each may be the one kept
            _save_checkpoint(model_engine, state, metrics, rank, cfg.train.zero_stage, export=export)
        else:
            ray.train.report(metrics)  # a barrier: every rank reports at the same steps
        if stop:
            return
