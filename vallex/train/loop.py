"""The per-worker training loop that Ray Train runs on every rank.

``setup -> (resume) -> train steps -> evaluate -> checkpoint -> ... -> finish``, one method of
:class:`WorkerRun` each. Everything a worker needs arrives in ``train_loop_config`` (see
``vallex.train.trainer``), the run's facts as a :class:`vallex.train.plan.RunPlan`.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from vallex.config import Config, config_from_dict
from vallex.data.batching import PaddingStats, train_batches, validation_indices
from vallex.data.collate import collate
from vallex.data.corpus import rank_block, read_rank_rows
from vallex.data.mixing import MixStats
from vallex.eval.intelligibility import Intelligibility, synthesized_rows
from vallex.eval.losses import evaluate, to_device
from vallex.model.checkpoint import consolidated_state_dict, load_weights
from vallex.model.vallex import VallexConfig, VallexModel
from vallex.train import engine as ds_engine
from vallex.train.guard import ForgettingGuard
from vallex.train.metrics import flat_metrics
from vallex.train.online_mix import OnlineMix
from vallex.train.plan import RunPlan
from vallex.train.tracking import Tracker

log = logging.getLogger("vallex.train")

STATE_FILE = "vallex_state.json"
EXPORT_FILE = "model.pt"
CHECKPOINT_TAG = "ckpt"


def _validation_batches(
    tables: dict,
    language_ids: dict[str, int],
    num_codebooks: int,
    batch_size: int,
    rank: int,
    world: int,
    max_tokens: int = 0,
) -> dict[str, list[dict[str, torch.Tensor]]]:
    """This rank's block of each language's validation table (:func:`vallex.data.corpus.rank_block`), as
    collated batches (under ``data.max_tokens`` too when set: see vallex.data.batching.validation_indices)."""
    out = {}
    for lang, table in tables.items():
        part = table.take(rank_block(table.num_rows, rank, world))
        rows = {c: part.column(c).to_numpy(zero_copy_only=False) for c in part.column_names}
        out[lang] = [
            collate({c: v[idx] for c, v in rows.items()}, language_ids, num_codebooks)
            for idx in validation_indices(rows, batch_size, max_tokens)
        ]
    return out


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


def evaluates_at(step: int, train) -> bool:
    """Whether the loop evaluates after ``step``: the first step, every ``eval_every``, every checkpoint
    (``checkpoint_every``) and the last step. Online weights change only there."""
    return (
        step == 1
        or step % train.eval_every == 0
        or step % train.checkpoint_every == 0
        or step == train.max_steps
    )


def train_loop_per_worker(loop_config: dict) -> None:
    """What Ray Train runs on every rank: set up, (step 0 evaluation), train, then finish."""
    with Tracker(loop_config.get("tracking")) as tracker:  # ends the MLflow / W&B runs, failed or not
        run = WorkerRun.setup(loop_config, tracker)
        if run.needs_baseline:
            run.evaluate_baseline()
        run.train()


@dataclass
class Window:
    """What the steps since the last evaluation did (reset at each evaluation)."""

    t0: float = field(default_factory=time.perf_counter)
    rows: int = 0
    losses: list = field(default_factory=list)

    def train_loss(self) -> float | None:
        return float(torch.stack(self.losses).float().mean()) if self.losses else None

    def reset(self) -> None:
        self.t0, self.rows, self.losses = time.perf_counter(), 0, []


@dataclass
class WorkerRun:
    """One rank's run: what :meth:`setup` built, and the state a checkpoint keeps (``progress``).

    ``progress`` is what ``vallex_state.json`` and the DeepSpeed client state hold: step, batches this
    rank consumed, the all-ranks language counts, the guard's best losses, the step-0 losses and the
    tracking run ids. Every method that runs a collective is called by every rank at the same step.
    """

    cfg: Config
    plan: RunPlan
    rank: int
    world: int
    device: torch.device
    model_engine: object
    tracker: Tracker
    sink: object
    objective: Callable[[dict], dict] | None
    guard_baseline: dict | None
    resumed: bool
    progress: dict
    engine_facts: dict
    valid_batches: dict = field(default_factory=dict)
    filler: dict = field(default_factory=dict)
    intelligibility: Intelligibility | None = None
    online: OnlineMix | None = None  # data.weights=online: the weights and rows of each stretch
    mix: MixStats = field(default_factory=MixStats)
    padding: PaddingStats = field(default_factory=PaddingStats)  # since the last evaluation
    guard: ForgettingGuard | None = None

    # ------------------------------------------------------------------------------------- setup

    @classmethod
    def setup(cls, loop_config: dict, tracker: Tracker) -> WorkerRun:
        """Build the model and DeepSpeed engine, restore a checkpoint if Ray Train gives one, read this
        worker's validation data, and set up the guard."""
        import ray
        import ray.train

        cfg: Config = config_from_dict(loop_config["config"])
        plan: RunPlan = loop_config["plan"]
        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        torch.manual_seed(cfg.run.seed)  # identical init on every rank
        if not cfg.train.use_gpu:
            torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
        model = VallexModel(VallexConfig(**plan.model_config))
        # This run's own latest checkpoint (a restart), else the one it was told to continue (a PBT segment).
        ckpt = ray.train.get_checkpoint() or loop_config.get("start_checkpoint")
        if ckpt is None and loop_config.get("init_state") is not None:  # train.init_from, grown by the driver
            load_weights(model, ray.get(loop_config["init_state"]), cfg.train.init_from)
        model_engine, _, _ = ds_engine.initialize(model, cfg.train)
        ds_engine.use_weights_only_loads(model_engine)  # a resume must not unpickle code from storage
        run = cls(
            cfg=cfg,
            plan=plan,
            rank=rank,
            world=world,
            device=ds_engine.device_for(cfg.train),
            model_engine=model_engine,
            tracker=tracker,
            sink=loop_config.get("sink"),
            objective=loop_config.get("objective"),
            guard_baseline=loop_config.get("guard_baseline"),
            resumed=ckpt is not None,
            progress={"step": 0, "consumed_batches": 0, "mix": {}, "guard_best": {}, "initial": None},
            # What DeepSpeed actually runs (not what was asked): sent with the first record of each (re)start.
            engine_facts={
                "zero_stage": model_engine.zero_optimization_stage(),
                "offload_optimizer": model_engine.zero_offload_optimizer() is not None,
                "offload_param": model_engine.zero_offload_param() is not None,
                "bf16": bool(model_engine.bfloat16_enabled()),
                "world_size": world,
                "device": str(ds_engine.device_for(cfg.train)),
            },
        )
        run._restore(ckpt)
        run._read_validation(loop_config["valid_ref"], loop_config.get("intelligibility"))
        if (
            rank == 0
        ):  # the checkpoint holds the all-ranks counts: one rank restores them, the sum stays right
            run.mix.counts.update(run.progress["mix"])
        run.guard = run._make_guard(run.progress.get("initial"))
        if plan.online is not None:  # the checkpoint's weights and stream positions, or the prior's
            base = ray.get(loop_config["online_base"])
            run.online = OnlineMix(plan.weights, plan.online, base, run.progress.get("online"))
        return run

    def _restore(self, ckpt) -> None:
        """Load Ray Train's checkpoint (if any) into the engine and ``progress``; open the trackers."""
        import ray

        if ckpt is not None:
            with ckpt.as_directory() as d:
                ds_engine.check_checkpoint_files(d)  # names a file holding more than weights, before any load
                self.progress = json.loads(Path(d, STATE_FILE).read_text())
                saved_world = self.progress.get("world_size", self.world)
                resume(self.model_engine, d, saved_world, self.world, self.cfg.train.zero_stage, self.rank)
        self.progress["world_size"] = self.world
        self.progress["tracking"] = self.tracker.open(self.rank, self.progress.get("tracking"))
        if self.rank == 0 and self.sink is not None:  # metrics.jsonl continues this checkpoint's timeline
            note = ray.get(self.sink.restart_at.remote(self.progress["step"] if ckpt is not None else None))
            if note:
                log.warning("%s", note)

    def _read_validation(self, valid_ref: dict, intelligibility: dict | None) -> None:
        """This rank's validation batches, the filler batch, and the intelligibility evaluation.

        Read from the shards here, not gathered on the driver: the validation split up to
        data.valid_max_rows per language. This rank scores a contiguous block of each language's rows
        and reads only their row groups, plus the light columns of every row (text gain's derangement,
        the synthesis plan) and the few rows it synthesizes (vallex.data.corpus.read_rank_rows)."""
        plan, cfg = self.plan, self.cfg
        rank, world = self.rank, self.world

        def extra(light: dict) -> dict:
            rows = synthesized_rows(cfg, light, rank, world, intelligibility)
            if not any(len(rank_block(t.num_rows, rank, world)) for t in light.values()):
                lang = next(iter(light))  # no row of its own: the filler is the first language's first row
                rows[lang] = {*rows.get(lang, ()), 0}
            return rows

        tables = read_rank_rows(valid_ref, rank, world, extra)
        ids = plan.language_ids
        self.valid_batches = _validation_batches(
            tables, ids, plan.num_codebooks, cfg.train.batch_size, rank, world, cfg.data.max_tokens
        )
        # A real batch whose results are discarded: the first row this rank has read.
        lang, row = next(
            (
                (lang, int(b[0]))
                for lang, t in tables.items()
                if len(b := rank_block(t.num_rows, rank, world))
            ),
            (next(iter(tables)), 0),
        )
        first = tables[lang].slice(row, 1)
        self.filler = _validation_batches({"_": first}, ids, plan.num_codebooks, 1, 0, 1)["_"][0]
        # Text gain, PER of synthesized speech, listening samples (vallex.eval.intelligibility).
        self.intelligibility = Intelligibility(
            cfg, tables, plan, self.rank, self.world, self.model_engine.module, intelligibility
        )

    def _make_guard(self, initial: dict | None) -> ForgettingGuard:
        """Reference per language: train.guard.baseline's file, else (init_from) the loss the languages
        the model already knew had before this run trained it, else the run's own best."""
        g = self.cfg.train.guard
        return ForgettingGuard(
            g.max_rise,
            g.per_language,
            self.guard_baseline or initial,
            g.metric,
            best=self.progress.get("guard_best"),
            source="baseline" if self.guard_baseline else "initial",
            floor=g.floor,
        )

    @property
    def needs_baseline(self) -> bool:
        """A run from ``train.init_from`` evaluates at step 0 (not again when it resumes)."""
        return bool(self.cfg.train.init_from) and not self.resumed

    # --------------------------------------------------------------------------------- evaluate

    def evaluate_baseline(self) -> None:
        """Step 0: where every language stands before this run trains the model (the forgetting baseline)."""
        import ray.train

        record = self.evaluation(0, Window())
        known = set(self.plan.init_languages)
        metric = self.cfg.train.guard.metric
        self.progress["initial"] = {
            lang: v[metric]
            for lang, v in record["valid"].items()
            if lang in known and v.get(metric) is not None
        }
        self.guard = self._make_guard(self.progress["initial"])
        record["guard"] = self.guard.check(record["valid"])
        record["stopped_by_guard"] = False
        ray.train.report(self.publish(record))

    def evaluation(self, step: int, window: Window) -> dict:
        """Evaluate every language; the record metrics.jsonl keeps (identical on every rank)."""
        engine, device, languages = self.model_engine, self.device, list(self.plan.languages)
        valid = evaluate(
            engine,
            self.valid_batches,
            list(self.plan.eval_languages),
            device,
            self.cfg.train.train_stage,
            self.filler,
        )
        self.intelligibility.evaluate(
            engine, valid, device, self.filler, step, self.sink if self.rank == 0 else None
        )
        counts = global_counts(self.mix, languages, device)
        total = max(sum(counts.values()), 1)
        elapsed = time.perf_counter() - window.t0
        return {
            "step": step,
            "train_loss": window.train_loss(),
            "lr": float(engine.get_lr()[0]),
            "valid": valid,
            "realized_fractions": {lang: counts[lang] / total for lang in languages},
            "samples_seen": int(sum(counts.values())),
            "languages_per_batch": languages_per_batch(self.mix, device),
            "padding_fraction": padding_fraction(self.padding, device),
            "samples_per_s": window.rows * self.world / max(elapsed, 1e-9),
            # Steps DeepSpeed skipped on a loss-scale overflow (fp16): counted, not trained.
            "skipped_steps": int(getattr(engine, "skipped_steps", 0) or 0),
            "time": time.time(),
            # On a GPU: the most memory this rank's tensors have held so far (weights, optimizer, activations).
            **(
                {"cuda_max_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}
                if device.type == "cuda"
                else {}
            ),
        }

    def publish(self, record: dict) -> dict:
        """Send the record to the driver's sink (rank 0); the flat metrics every rank reports."""
        import ray

        if self.rank == 0 and self.sink is not None:
            if self.engine_facts:
                record = {**record, "engine": dict(self.engine_facts)}
                self.engine_facts.clear()
            ray.get(self.sink.log.remote(record))
        metrics = flat_metrics(record)
        if self.objective is not None:  # a Tune trial's score of the per-language losses
            metrics.update(self.objective(record["valid"]))
        self.tracker.log(metrics)
        return metrics

    # ------------------------------------------------------------------------------------ train

    def train(self) -> None:
        """Train steps until ``train.max_steps``, evaluating and checkpointing on the way; returns early
        when the guard stops the run or a loss is not finite."""
        import ray.train

        cfg = self.cfg
        if self.online is not None:
            stream = self._online_batches()
        else:
            # Ray Data has no mid-stream position: after a resume, skip the batches this rank already used
            # (same count, not necessarily the same rows: see docs in vallex.data.mixing). With data.max_tokens
            # the batch sizes vary, but the batches are a function of the stream, so the same count is skipped.
            stream = train_batches(
                ray.train.get_dataset_shard("train"),
                batch_size=cfg.train.batch_size,
                max_tokens=cfg.data.max_tokens,
                bucket_rows=cfg.data.bucket_rows,
                shuffle_buffer=cfg.data.shuffle_buffer,
                seed=cfg.run.seed,
                rank=self.rank,
                skip=self.progress["consumed_batches"],
            )
        window = Window()
        self.model_engine.train()
        while self.progress["step"] < cfg.train.max_steps:
            self.train_step(stream, window)
            step = self.progress["step"]
            last = step == cfg.train.max_steps
            checkpoint = step % cfg.train.checkpoint_every == 0 or last
            # Every checkpoint is evaluated too, so each one carries its metrics (keep-best, Tune).
            if not evaluates_at(step, cfg.train):
                continue
            if self.evaluate_and_checkpoint(step, window, checkpoint=checkpoint, last=last):
                return

    def _online_batches(self):
        """This rank's batches with data.weights=online: one stretch per span between evaluations,
        each drawn at the weights the evaluation before it set (vallex.train.online_mix). A resumed run
        starts the next stretch where the checkpoint's stretch ended: nothing to skip."""
        t = self.cfg.train

        def stretch_end(start: int) -> int:
            return next(s for s in range(start + 1, t.max_steps + 1) if evaluates_at(s, t))

        return self.online.batches(
            self.progress,
            stretch_end,
            rank=self.rank,
            world=self.world,
            batch_size=t.batch_size,
            grad_accum=t.grad_accum,
        )

    def train_step(self, stream, window: Window) -> None:
        """One optimizer step: ``train.grad_accum`` micro-batches through DeepSpeed."""
        cfg, plan = self.cfg, self.plan
        for _ in range(cfg.train.grad_accum):
            np_batch = next(stream)
            self.mix.update(np_batch)
            self.padding.update(np_batch)
            batch = to_device(collate(np_batch, plan.language_ids, plan.num_codebooks), self.device)
            out = self.model_engine(batch, train_stage=cfg.train.train_stage)
            # A token mean over this batch; DeepSpeed weighs every micro-batch alike (1/grad_accum, mean
            # over ranks), whatever its rows: see vallex.data.batching on what data.max_tokens does to that.
            self.model_engine.backward(out["loss"])
            self.model_engine.step()
            self.progress["consumed_batches"] += 1
            window.rows += len(np_batch["language"])
            window.losses.append(out["loss"].detach())  # no host sync per step; read at evaluation
        self.progress["step"] += 1

    def evaluate_and_checkpoint(self, step: int, window: Window, *, checkpoint: bool, last: bool) -> bool:
        """Evaluate, judge (guard, non-finite losses), report with or without a checkpoint; whether the
        run stops here. Every verdict is identical on every rank (all-reduced losses)."""
        import ray.train

        record = self.evaluation(step, window)
        record["guard"] = self.guard.check(record["valid"])
        train_loss = record["train_loss"]
        nonfinite = nonfinite_losses(
            record, any_rank(not _finite(train_loss), self.device), self.cfg.train.on_nonfinite
        )
        stop = self.cfg.train.guard.action == "stop" and bool(ForgettingGuard.tripped(record["guard"]))
        record["stopped_by_guard"] = stop and not nonfinite
        if nonfinite:
            # The weights are no longer numbers: reported without a checkpoint of them, and the run ends.
            record["stopped_nonfinite"] = nonfinite
            ray.train.report(self.publish(record))
            return True
        if self.online is not None:  # this evaluation sets the next stretch's weights
            record["online"] = self.online.update(step, record["valid"], self.device)
        metrics = self.publish(record)
        window.reset()
        self.padding.reset()
        if stop or checkpoint:
            self.save(
                metrics, export=last or stop or bool(self.cfg.train.keep_best_by)
            )  # keep-best: any may be kept
        else:
            ray.train.report(metrics)  # a barrier: every rank reports at the same steps
        return stop

    # ------------------------------------------------------------------------------- checkpoint

    def save(self, metrics: dict, *, export: bool) -> None:
        """Store the all-ranks counts and the guard's state in ``progress``, then checkpoint and report."""
        self.progress["mix"] = global_counts(self.mix, list(self.plan.languages), self.device)
        self.progress["guard_best"] = self.guard.best
        if self.online is not None:
            self.progress["online"] = self.online.state()
        _save_checkpoint(
            self.model_engine, self.progress, metrics, self.rank, self.cfg.train.zero_stage, export=export
        )
