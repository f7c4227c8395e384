"""Distributed training end to end: Ray Train, 2 workers, DeepSpeed ZeRO-2 on CPU, per-language validation."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from tests.conftest import train_worker_pids
from vallex.config import load_config
from vallex.data.synthetic import write_synthetic_corpus
from vallex.train.metrics import read_metrics
from vallex.train.trainer import train

SIZES = {"en": 48, "zh": 32, "ar": 6}  # ar: a small, upsampled language


def _cfg(tmp_path, *overrides):
    return load_config(
        None,
        [
            f"run.output_dir={tmp_path}",
            "run.name=t",
            "model.size=tiny",
            "train.num_workers=2",
            "train.cpus_per_worker=0.5",
            "train.zero_stage=2",
            "train.batch_size=4",
            "train.max_steps=6",
            "train.warmup_steps=2",
            "train.eval_every=3",
            "train.checkpoint_every=3",
            "data.weights=uniform",
            "data.window_rows=32",
            *overrides,
        ],
    )


@pytest.fixture
def corpus_cfg(tmp_path):
    write_synthetic_corpus(tmp_path / "prepare", SIZES, valid_per_language=5, frames=(15, 40))
    return tmp_path


class _RunsCode:
    """Pickles as a call that creates ``marker``: what a planted checkpoint file could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_two_workers_zero2_per_language_validation_and_resume(ray_cluster, corpus_cfg, caplog):
    from vallex.data.corpus import PreparedCorpus
    from vallex.eval.recognizer import train_recognizer

    # A recognizer beside the shards (2 steps: it reads nothing, but it scores deterministically): the
    # run measures the PER of synthesized speech with it.
    small = {"dim": 16, "hidden": 16, "threads": 1, "log_every": 0}
    recognizer = train_recognizer(PreparedCorpus.open(corpus_cfg / "prepare"), steps=2, batch_size=8, **small)
    recognizer.save(str(corpus_cfg / "prepare"))
    cfg = _cfg(corpus_cfg, *ONLINE)
    report = train(cfg)

    records = read_metrics(cfg.train_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 3, 6]  # first step, every eval_every, last step
    for r in records:
        assert set(r["valid"]) == set(SIZES)
        for lang, v in r["valid"].items():
            assert v["ar_tokens"] > 0 and 0 < v["ar_loss"] < 50 and 0 < v["nar_loss"] < 50, (lang, v)
            assert 0.0 <= v["ar_top10"] <= 1.0
        assert sum(r["realized_fractions"].values()) == pytest.approx(1.0)
    assert 1.0 < records[-1]["languages_per_batch"] <= 3.0  # batches mix languages
    # uniform weights: the 6-row language is drawn about as often as the others (upsampled 3x+)
    assert records[-1]["realized_fractions"]["ar"] > 0.2
    # The samples counted are every worker's: 2 workers x 4 per batch x steps.
    assert records[-1]["samples_seen"] == 2 * 4 * 6

    saved = json.loads((cfg.train_dir / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["steps"] == 6 and set(saved["languages"]) == set(SIZES)
    assert (cfg.train_dir / "valid_loss.png").stat().st_size > 1000
    _check_online_stretches(cfg, records, saved)
    # model.pt is a self-describing vallex checkpoint: synthesis rebuilds the model from it alone
    from vallex.model.checkpoint import load_checkpoint

    model, meta = load_checkpoint(cfg.train_dir / "model.pt")
    assert meta["languages"] == sorted(SIZES) and meta["size"] == "tiny"
    assert model.ar_language_embedding.word_embeddings.weight.shape[0] == len(SIZES)
    _check_intelligibility(cfg, records, saved, model, recognizer)

    # Every file of the real ZeRO-2 checkpoint loads weights-only (tensors + the allow-listed types).
    from ray.train import TrainingFailedError

    from vallex.train.engine import load_weights_only, unsafe_globals

    (ckpt_dir,) = [  # the step-6 checkpoint, the one a resume restores
        d
        for d in (corpus_cfg / "ray_results" / "t").glob("checkpoint_*")
        if d.is_dir() and json.loads((d / "vallex_state.json").read_text())["step"] == 6
    ]
    files = sorted(ckpt_dir.rglob("*.pt"))
    assert len(files) >= 4  # model states, 2 optimizer partitions, model.pt
    for f in files:
        assert unsafe_globals(f) == [] and isinstance(load_weights_only(f), dict), f

    # Someone who can write to the storage plants pickled code in a partition file: the resume refuses,
    # naming the file, and the code never runs (one worker: it checks every file of the checkpoint).
    victim = ckpt_dir / "ckpt" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    original = victim.read_bytes()
    marker = corpus_cfg / "PWNED"
    torch.save({"optimizer_state_dict": _RunsCode(marker)}, victim)
    with pytest.raises(
        TrainingFailedError,
        match=rf"{victim.name} holds posix.system, which a weights-only load does not allow",
    ):
        train(_cfg(corpus_cfg, *ONLINE, "train.max_steps=9", "train.num_workers=1"))
    assert not marker.exists()
    victim.write_bytes(original)

    # A kill mid-append left a torn line, after a record of an abandoned timeline (a step past the
    # checkpoint, with a guard trip): readers skip the torn tail; the resume cuts both, and says so.
    metrics = cfg.train_dir / "metrics.jsonl"
    tripped = {lang: {**v, "tripped": True} for lang, v in records[-1]["guard"].items()}
    abandoned = {**records[-1], "step": 7, "guard": tripped}
    metrics.write_text(metrics.read_text() + json.dumps(abandoned) + "\n" + '{"step": 8, "train_lo')
    assert [r["step"] for r in read_metrics(metrics)] == [1, 3, 6, 7]

    # Same run again with more steps: resumes from the step-6 checkpoint instead of starting over.
    # Each worker writes what its engine holds right after the load (see _probe_resumed_state).
    probe = corpus_cfg / "resumed"
    # The intelligibility figures were checked above: the resumed runs skip them (synthesis is most of
    # an evaluation's cost).
    quiet = (
        "train.intelligibility.samples=false",
        "train.intelligibility.text_gain=false",
        "train.intelligibility.per_utterances=0",
    )
    cfg2 = _cfg(corpus_cfg, *ONLINE, *quiet, "train.max_steps=9")
    with _probe_resumed_state(probe):
        report2 = train(cfg2)
    _check_restored_bit_for_bit(probe, ckpt_dir, world=2)
    records = read_metrics(cfg2.train_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 3, 6, 9]
    _check_online_stretches(cfg2, records, report2)
    # The online weights' history and the streams' positions came back with the checkpoint: the
    # step-9 state continues the step-6 one exactly, and the stretch after step 6 drew step 6's weights.
    (step9,) = [
        d
        for d in (corpus_cfg / "ray_results" / "t").glob("checkpoint_*")
        if d.is_dir() and json.loads((d / "vallex_state.json").read_text())["step"] == 9
    ]
    before = json.loads((ckpt_dir / "vallex_state.json").read_text())["online"]
    after = json.loads((step9 / "vallex_state.json").read_text())["online"]
    assert after["weights"]["history"][:3] == before["weights"]["history"]
    assert [h["step"] for h in after["weights"]["history"]] == [1, 3, 6, 9]
    assert after["stretches"]["index"] == before["stretches"]["index"] + 1 == 4
    assert records[3]["online"]["stretch"]["weights"] == before["weights"]["history"][-1]["weights"]
    assert records[-1]["samples_seen"] == 2 * 4 * 9  # mix counts were restored with the checkpoint
    assert metrics.read_text().endswith("}\n") and report2["guard"]["trips"] == []
    assert report2["skipped_steps"] == 0 and report2["trained_steps"] == 9  # fp32: DeepSpeed skips none
    note = "restarting from the checkpoint of step 6: removed 1 record(s) after it and a torn last line"
    assert any(note in m for m in caplog.messages)

    # Elastic: the same run continues on 1 worker. ZeRO-2 shards the optimizer per worker, so the
    # weights come back and the optimizer moments restart.
    cfg3 = _cfg(corpus_cfg, *ONLINE, *quiet, "train.max_steps=12", "train.num_workers=1")
    with _probe_resumed_state(probe / "elastic"):
        train(cfg3)
    (step9,) = [
        d
        for d in (corpus_cfg / "ray_results" / "t").glob("checkpoint_*")
        if d.is_dir() and json.loads((d / "vallex_state.json").read_text())["step"] == 9
    ]
    (held,) = _load_probe(probe / "elastic")
    saved = load_weights_only(step9 / "ckpt" / "mp_rank_00_model_states.pt")["module"]
    _assert_same(held["module"], saved, "weights after the elastic resume")
    assert _adam_states(held["optimizer"]) == [], "moments restart at another world size"
    records = read_metrics(cfg3.train_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 3, 6, 9, 12]
    _check_online_stretches(cfg3, records, None)
    assert records[-1]["samples_seen"] == 2 * 4 * 9 + 1 * 4 * 3
    # the weights were restored, not re-initialized: validation loss continues from where it was
    assert records[-1]["valid"]["en"]["loss"] < records[0]["valid"]["en"]["loss"]


# data.weights=online in the test above: the weights move at each evaluation (ar's reference loss is the
# lowest, so its excess is the largest and it gains rows), each stretch read by the workers themselves.
ONLINE = [
    "data.weights=online",
    "data.online.prior=uniform",
    "data.online.reference={en: 2.0, zh: 2.5, ar: 1.0}",
    "data.online.step_size=1.0",
]


def _check_online_stretches(cfg, records, report) -> None:
    """Every evaluation updated the weights for the next stretch; every rank drew the same weights;
    each stretch's rows per language, as trained (the realized counts' differences between
    evaluations), are exactly what an in-process plan of the same weights and carried positions gives."""
    from vallex.data.corpus import PreparedCorpus
    from vallex.data.mixing import MixPlan, Stretches, normalize_weights

    corpus = PreparedCorpus.open(cfg.prepared_dir)
    base = MixPlan.build(
        corpus, normalize_weights(corpus, dict.fromkeys(SIZES, 1.0)), num_rows=0, seed=0, window_rows=32
    )
    stretches, drawn, before = Stretches(base), dict.fromkeys(SIZES, 1 / 3), dict.fromkeys(SIZES, 0)
    for r in records:
        online = r["online"]
        assert online["stretch"]["index"] == stretches.index
        assert online["stretch"]["weights"] == pytest.approx(drawn, abs=1e-12)
        ranks = online["drawn_by_rank"]
        assert len(ranks) == (1 if r["step"] > 9 else 2)  # the elastic resume runs on 1 worker
        assert all(w == ranks[0] for w in ranks) and ranks[0] == pytest.approx(drawn, abs=1e-12)
        seen = {lang: round(f * r["samples_seen"]) for lang, f in r["realized_fractions"].items()}
        trained = {lang: seen[lang] - before[lang] for lang in SIZES}
        # The stretch's rows: the same world size as the run had then (the elastic resume has 1).
        expected = stretches.advance(stretches.plan(drawn, r["samples_seen"] - sum(before.values())))
        assert online["stretch"]["rows"] == expected == trained, (r["step"], trained, expected)
        assert set(online["signal"]) == set(SIZES) and online["weights"] != drawn  # the weights moved
        drawn, before = online["weights"], seen
    last = records[-1]["online"]["weights"]
    assert last["ar"] == max(last.values()) and last["ar"] > 1 / 3
    if report is not None:
        assert report["online"]["history"] == [
            {"step": r["step"], **{k: r["online"][k] for k in ("weights", "signal", "stretch")}}
            for r in records
        ]
        assert report["online"]["reference"] == {"en": 2.0, "zh": 2.5, "ar": 1.0}
        assert (cfg.train_dir / "online_weights.png").stat().st_size > 1000
        final = json.loads((cfg.train_dir / "online_weights.json").read_text())
        assert final["weights"] == records[-1]["online"]["weights"] == report["online"]["final_weights"]


@contextlib.contextmanager
def _probe_resumed_state(folder):
    """Run the Train workers through a wrapper that, right after ``vallex.train.loop.resume`` loads a
    checkpoint, saves what the engine holds (module weights, the ZeRO optimizer's state dict) to
    ``folder/rank<r>.pt``, then trains on unchanged. The wrapper is a local function, so Ray pickles it
    by value into the workers; the real loop runs in them."""
    import vallex.train.loop as loop

    folder.mkdir(parents=True, exist_ok=True)
    real = loop.train_loop_per_worker
    out = str(folder)

    def probed_loop(loop_config):
        import os

        import torch

        import vallex.train.loop as worker_loop

        load = worker_loop.resume

        def resume_and_save(model_engine, ckpt_dir, saved_world, world, zero_stage, rank):
            load(model_engine, ckpt_dir, saved_world, world, zero_stage, rank)
            held = {
                "module": {k: v.detach().clone() for k, v in model_engine.module.state_dict().items()},
                "optimizer": model_engine.optimizer.state_dict(),
                "ckpt_dir": str(ckpt_dir),
            }
            torch.save(held, os.path.join(out, f"rank{rank}.pt"))

        worker_loop.resume = resume_and_save
        try:
            worker_loop.train_loop_per_worker(loop_config)
        finally:
            worker_loop.resume = load

    loop.train_loop_per_worker = probed_loop
    try:
        yield
    finally:
        loop.train_loop_per_worker = real


def _load_probe(folder):
    return [torch.load(p, weights_only=False) for p in sorted(folder.glob("rank*.pt"))]


def _assert_same(held, saved, what, path="") -> None:
    """Bit-for-bit equality of nested dicts/lists of tensors and plain values."""
    if isinstance(saved, torch.Tensor):
        assert isinstance(held, torch.Tensor) and held.dtype == saved.dtype, (what, path)
        assert torch.equal(held, saved), f"{what}: {path} differs from the checkpoint"
    elif isinstance(saved, dict):
        assert set(held) == set(saved), (what, path, sorted(held), sorted(saved))
        for k in saved:
            _assert_same(held[k], saved[k], what, f"{path}/{k}")
    elif isinstance(saved, list | tuple):
        assert len(held) == len(saved), (what, path)
        for i, (h, v) in enumerate(zip(held, saved, strict=True)):
            _assert_same(h, v, what, f"{path}[{i}]")
    elif type(saved).__eq__ is object.__eq__ and hasattr(saved, "__dict__"):  # e.g. DeepSpeed's LossScaler
        assert type(held) is type(saved), (what, path)
        _assert_same(vars(held), vars(saved), what, path)
    else:
        assert held == saved, (what, path, held, saved)


def _adam_states(optimizer_state: dict) -> list[dict]:
    """The per-parameter Adam states in a ZeRO-1/2 optimizer state dict (either of DeepSpeed's layouts)."""
    base = optimizer_state["base_optimizer_state"]
    return list(base["state"].values()) if isinstance(base, dict) else [s for s in base if s]


def _check_restored_bit_for_bit(probe, ckpt_dir, world: int) -> None:
    """Each rank's engine, right after the resume, holds exactly the checkpoint's weights and its own
    ZeRO partition of the optimizer: fp32 master weights and both Adam moments."""
    from vallex.train.engine import load_weights_only

    held = _load_probe(probe)
    assert len(held) == world
    saved_module = load_weights_only(ckpt_dir / "ckpt" / "mp_rank_00_model_states.pt")["module"]
    for rank, state in enumerate(held):
        _assert_same(state["module"], saved_module, f"rank {rank} weights")
        part = ckpt_dir / "ckpt" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        saved_optim = load_weights_only(part)["optimizer_state_dict"]
        moments = _adam_states(saved_optim)
        assert moments and all(
            set(m) >= {"exp_avg", "exp_avg_sq"} and m["exp_avg_sq"].abs().sum() > 0 for m in moments
        ), "the checkpoint holds Adam moments that training filled"
        _assert_same(state["optimizer"], saved_optim, f"rank {rank} optimizer state")


def _check_intelligibility(cfg, records, report, model, recognizer):
    """Text gain and PER in every record, all-reduced over the 2 ranks: the same as one process computes
    from the exported weights; listening samples per evaluation."""
    from vallex.data.corpus import PreparedCorpus
    from vallex.eval.intelligibility import Intelligibility
    from vallex.train.loop import _validation_batches, evaluate
    from vallex.train.plan import plan_run

    for r in records:
        for v in r["valid"].values():
            keys = ("text_gain", "ar_text_gain", "nar_text_gain", "per", "per_floor")
            assert all(isinstance(v[k], float) for k in keys), v
            assert v["per_utterances"] == 2
    corpus = PreparedCorpus.open(cfg.prepared_dir)
    tables = {lang: corpus.read_split(lang, "valid") for lang in sorted(SIZES)}
    plan = plan_run(cfg)
    assert plan.language_ids == {lang: i for i, lang in enumerate(sorted(SIZES))}
    batches = _validation_batches(tables, plan.language_ids, 8, 3, 0, 1)
    valid = evaluate(model, batches, list(plan.languages), torch.device("cpu"), "both", batches["en"][0])
    extra = {"recognizer": recognizer.to_bytes(), "symbols": corpus.symbols}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers ran: the same sums, the same sampled codes
    try:
        Intelligibility(cfg, tables, plan, 0, 1, model, extra).evaluate(
            model, valid, "cpu", batches["en"][0], 6
        )
    finally:
        torch.set_num_threads(threads)
    for lang, v in valid.items():
        for key in ("ar_text_gain", "nar_text_gain"):
            assert records[-1]["valid"][lang][key] == pytest.approx(v[key], abs=2e-4), (lang, key)
        for key in ("per", "per_floor"):  # edit counts summed over both ranks' shares of the subset
            assert records[-1]["valid"][lang][key] == pytest.approx(v[key]), (lang, key)
    for lang in SIZES:
        for key in ("text_gain", "per"):
            assert report["languages"][lang][key]["first"] == records[0]["valid"][lang][key]
            assert report["languages"][lang][key]["last"] == records[-1]["valid"][lang][key]
    assert report["intelligibility"]["per"] == "computed" and report["intelligibility"]["reason"] is None
    assert all(len(v) == 2 for v in report["intelligibility"]["synthesized"].values())
    for step in (1, 3, 6):
        folder = cfg.train_dir / "samples" / f"step_{step}"
        assert sorted(p.name for p in folder.glob("*.wav")) == [f"{lang}.wav" for lang in sorted(SIZES)]
        index = json.loads((folder / "samples.json").read_text())
        assert index["en"]["utt_id"] == report["intelligibility"]["synthesized"]["en"][0]["utt_id"]
        assert index["en"]["seconds"] == pytest.approx(index["en"]["frames"] / 75)


def test_zero3_guard_stops_every_rank_together(ray_cluster, corpus_cfg):
    """A baseline far better than anything reachable trips the guard at the first evaluation; with
    action=stop both ZeRO-3 ranks checkpoint and end at that step (no rank left in a collective).
    The run uses the zero3_offload preset's settings (CPU offload of weights and optimizer states,
    activation checkpointing), so they are shown to train and export under DeepSpeed too."""
    baseline = corpus_cfg / "baseline_report.json"
    baseline.write_text(json.dumps({"languages": {"en": {"last": {"loss": 0.5}}}}))
    cfg = _cfg(
        corpus_cfg,
        "run.name=guarded",
        "train.zero_stage=3",
        "train.max_steps=20",
        f"train.guard.baseline={baseline}",
        "train.guard.action=stop",
        "train.offload=all",
        "model.activation_checkpointing=true",
    )
    report = train(cfg)

    records = read_metrics(cfg.train_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1]
    assert records[0]["stopped_by_guard"] is True
    # DeepSpeed's own account of what it ran (sent with the first record of the run)
    assert records[0]["engine"] == {
        "zero_stage": 3,
        "offload_optimizer": True,
        "offload_param": True,
        "bf16": False,
        "world_size": 2,
        "device": "cpu",  # what the workers trained on (cuda:N on a GPU: bench/gpu_smoke.py checks it)
    }
    assert "cuda_max_memory_gib" not in records[0]  # a GPU figure: absent on CPU, not 0
    en = records[0]["guard"]["en"]
    assert en["tripped"] and en["reference_from"] == "baseline" and en["reference"] == 0.5
    # languages without a baseline compare with their own best, which at the first evaluation is itself
    assert not records[0]["guard"]["zh"]["tripped"] and records[0]["guard"]["zh"]["reference_from"] == "best"
    assert report["guard"]["stopped"] and report["guard"]["verdict"] == "forgetting"
    assert report["guard"]["trips"] == [{"step": 1, "languages": ["en"]}]
    # No recognizer beside the shards: text gain only, and why. ZeRO-3 synthesizes the listening samples
    # on rank 0 from gathered weights.
    assert report["intelligibility"]["per"] is None and "recognizer.pt" in report["intelligibility"]["reason"]
    assert all(v["text_gain"] is not None and "per" not in v for v in records[0]["valid"].values())
    assert len(list((cfg.train_dir / "samples" / "step_1").glob("*.wav"))) == len(SIZES)
    from vallex.train.engine import load_weights_only, unsafe_globals

    ckpt_files = sorted((corpus_cfg / "ray_results" / "guarded").rglob("*.pt"))
    assert any("zero_pp_rank_1" in f.name for f in ckpt_files)
    for f in ckpt_files:  # a real ZeRO-3 (offloaded) checkpoint loads weights-only
        assert unsafe_globals(f) == [] and isinstance(load_weights_only(f), dict), f
    # ZeRO-3 holds a slice of every parameter per rank; the export gathers them into whole tensors
    weights = torch.load(cfg.train_dir / "model.pt", weights_only=True)["model"]
    assert weights["ar_language_embedding.word_embeddings.weight"].shape == (len(SIZES), 64)

    # A ZeRO-3 checkpoint can't be resharded on load: resuming it on 1 worker fails at once, saying how.
    # (What a resume does with the saved world size, in process: the ZeRO-2 test resumes 2 -> 1 through
    # Ray Train, and its planted-file refusal shows a failed resume reaching the driver.)
    from vallex.train.loop import STATE_FILE, resume

    (ckpt,) = [d for d in (corpus_cfg / "ray_results" / "guarded").glob("checkpoint_*") if d.is_dir()]
    saved_world = json.loads((ckpt / STATE_FILE).read_text())["world_size"]
    assert saved_world == 2
    with pytest.raises(RuntimeError, match="written by 2 workers and cannot be loaded by 1"):
        resume(None, str(ckpt), saved_world, 1, 3, 0)


def test_killed_worker_restarts_from_checkpoint_and_finishes(ray_cluster, corpus_cfg, caplog):
    import os
    import signal
    import threading
    import time

    # One validation row per language: rank 1 holds none and runs filler batches in lockstep with rank 0.
    write_synthetic_corpus(corpus_cfg / "prepare", SIZES, valid_per_language=1, frames=(15, 40))
    cfg = _cfg(
        corpus_cfg,
        "run.name=faulty",
        "train.max_steps=30",  # the kill comes at step 15: 15 steps on after it
        "train.eval_every=5",
        "train.checkpoint_every=10",
        "train.max_failures=2",
        "train.intelligibility.samples=false",  # 6 evaluations: no listening samples needed here
        "train.intelligibility.text_gain=false",  # nor text gain (a second validation pass)
    )
    killed: list[int] = []

    def kill_one_worker_after_step_15():
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            if any(r["step"] >= 15 for r in read_metrics(cfg.train_dir / "metrics.jsonl")):
                pids = train_worker_pids()
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed.append(pids[-1])
            time.sleep(0.1)

    watcher = threading.Thread(target=kill_one_worker_after_step_15, daemon=True)
    watcher.start()
    report = train(cfg)
    watcher.join(timeout=5)

    assert killed, "the run ended before a worker could be killed"
    steps = [r["step"] for r in read_metrics(cfg.train_dir / "metrics.jsonl")]
    assert steps[-1] == 30 and report["steps"] == 30
    # The restart resumed from a checkpoint (step 10 or later) and cut the records written after it
    # (at least step 15's), so metrics.jsonl holds one timeline: each step once, in order.
    assert steps == sorted(set(steps)) and steps[:4] == [1, 5, 10, 15]
    cuts = [m for m in caplog.messages if "restarting from the checkpoint of step" in m]
    assert cuts and "removed" in cuts[0]
    # The mix counts came back with the checkpoint: every optimizer step counted exactly once.
    assert read_metrics(cfg.train_dir / "metrics.jsonl")[-1]["samples_seen"] == 2 * 4 * 30


def test_ar_only_stage_reports_no_nar_figures_and_a_nan_loss_stops_the_run(ray_cluster, corpus_cfg):
    """train.train_stage=ar leaves the NAR figures None. The learning rate (1e30, finite: the config
    takes it) sends the weights to inf at the first update: the run stops at that evaluation, naming
    the languages, and metrics.jsonl / report.json stay standard JSON (null + a ``nonfinite`` list)."""
    from vallex.train.trainer import NonFiniteLossError

    cfg = _cfg(
        corpus_cfg,
        "run.name=ar-only",
        "train.num_workers=1",
        "train.max_steps=3",
        "train.train_stage=ar",
        "train.lr=1.0e+30",
        "train.grad_clip=0",
    )
    with pytest.raises(
        NonFiniteLossError, match=r"step 1: the validation loss of ar \(ar_loss\), en \(ar_loss\)"
    ):
        train(cfg)

    def no_nan(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in a JSON file"))

    records = [no_nan(line) for line in (cfg.train_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1]  # stopped at the first evaluation, not step 3
    r = records[0]
    for v in r["valid"].values():
        assert v["nar_loss"] is None and v["nar_top10"] is None and v["nar_tokens"] == 0
        assert v["ar_tokens"] > 0 and v["ar_loss"] is None and v["loss"] is None  # NaN/inf -> null
    assert "valid.en.ar_loss" in r["nonfinite"] and "en (ar_loss)" in r["stopped_nonfinite"]
    assert all(g["tripped"] for g in r["guard"].values())  # and the guard is not disarmed by it
    report = no_nan((cfg.train_dir / "report.json").read_text())
    assert report["stopped_nonfinite"].startswith("step 1:") and report["guard"]["verdict"] == "forgetting"
    assert report["languages"]["en"]["best"] is None  # a diverged evaluation is no one's best


def test_init_from_keeps_old_ids_and_watches_languages_it_does_not_train(ray_cluster, tmp_path):
    """train.init_from: start from a trained model, add a language, train on it alone (the naive way);
    every language the model knew is still evaluated, from step 0, against its step-0 loss."""
    write_synthetic_corpus(tmp_path / "prepare", SIZES, valid_per_language=5, frames=(15, 40))
    one = ["train.num_workers=1", "train.max_steps=3", "train.eval_every=3", "train.checkpoint_every=3"]
    one.append("train.intelligibility.samples=false")
    base = _cfg(tmp_path, "run.name=base", "data.languages=[zh, en]", *one)
    base_report = train(base)
    assert base_report["model"]["languages"] == ["en", "zh"]

    grown = _cfg(
        tmp_path / "grown",
        "run.name=grown",
        f"run.prepared_dir={tmp_path / 'prepare'}",
        f"train.init_from={base.train_dir / 'model.pt'}",
        "data.languages=[ar]",
        *one,
        "train.checkpoint_every=1",
        "train.keep_checkpoints=1",
        "train.keep_best_by=loss/en",  # what the naive mode endangers
        # A learning rate far too high: updates make en worse, so the best checkpoint is not the newest.
        "train.lr=0.5",
        "train.warmup_steps=0",
    )
    report = train(grown)
    records = read_metrics(grown.train_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3]  # every checkpoint is evaluated
    zero = records[0]
    assert zero["train_loss"] is None and set(zero["valid"]) == {"en", "zh", "ar"}
    # Step 0 is the base model itself: same weights, same validation rows, same loss.
    for lang in ("en", "zh"):
        assert zero["valid"][lang]["loss"] == pytest.approx(
            base_report["languages"][lang]["last"]["loss"], 1e-5
        )
        assert records[-1]["guard"][lang]["reference_from"] == "initial"
        assert records[-1]["guard"][lang]["reference"] == pytest.approx(zero["valid"][lang]["loss"])
    assert records[-1]["guard"]["ar"]["reference_from"] == "best"
    assert all(r["realized_fractions"] == {"ar": 1.0} for r in records[1:])  # trained on ar alone
    assert report["trained_languages"] == ["ar"] and report["model"]["languages"] == ["en", "zh", "ar"]

    from vallex.model.checkpoint import load_checkpoint

    model, meta = load_checkpoint(grown.train_dir / "model.pt")
    assert meta["languages"] == ["en", "zh", "ar"]  # old ids kept, the new language appended
    assert model.ar_language_embedding.word_embeddings.weight.shape[0] == 3

    # Keep-best: the kept best checkpoint is the one with the lowest loss/en (step 0 has no checkpoint),
    # written as best_model.pt; storage holds it and the newest one only.
    best_step = min(records[1:], key=lambda r: r["valid"]["en"]["loss"])["step"]
    assert best_step < 3
    assert report["best_checkpoint"]["step"] == best_step
    assert report["best_checkpoint"]["value"] == pytest.approx(records[best_step]["valid"]["en"]["loss"])
    best, meta = load_checkpoint(grown.train_dir / "best_model.pt")
    assert meta["languages"] == ["en", "zh", "ar"]
    kept = [p for p in (tmp_path / "grown" / "ray_results" / "grown").glob("checkpoint_*") if p.is_dir()]
    assert len(kept) == 2

    with pytest.raises(ValueError, match=r"train.keep_best_by: 'loss/de' is not a reported metric"):
        train(
            _cfg(tmp_path / "bad", f"run.prepared_dir={tmp_path / 'prepare'}", "train.keep_best_by=loss/de")
        )


def test_keep_best_by_must_be_a_metric_this_run_reports():
    from vallex.train.trainer import check_keep_best_by

    check_keep_best_by("nar_loss/en", ["en", "zh"], False, "both")
    check_keep_best_by("", ["en"], False, "ar")
    with pytest.raises(ValueError, match=r"'nar_loss/en' is not a reported metric"):
        check_keep_best_by("nar_loss/en", ["en", "zh"], False, "ar")  # the NAR is not trained
    with pytest.raises(ValueError, match=r"'objective' is not a reported metric"):
        check_keep_best_by("objective", ["en"], False, "both")  # only Tune trials report it
    check_keep_best_by("objective", ["en"], True, "both")


_LEAN_START = """
import json, os, sys
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import torch, torch.distributed as dist
dist.init_process_group("gloo", rank=0, world_size=1)
from vallex.config import load_config
from vallex.model.vallex import VallexConfig, VallexModel
from vallex.train import engine
cfg = load_config(None, ["train.zero_stage=2", "train.batch_size=2"])

def start():
    model = VallexModel(VallexConfig(d_model=16, nhead=2, num_layers=1, num_phonemes=20, num_languages=2))
    ds, _, _ = engine.initialize(model, cfg.train)
    return {
        "zero": ds.zero_optimization_stage(),
        "inductor": "torch._inductor.compile_fx" in sys.modules,
        "mlflow": sys.modules.get("mlflow") is not None,
        "dynamo_env": os.environ.get("TORCHDYNAMO_DISABLE"),
    }

out = {"first": start()}
import mlflow  # importable afterwards: train.tracking still works in this process
os.environ["TORCHDYNAMO_DISABLE"] = "0"
out["second"] = start()  # a worker whose tracker loaded mlflow first keeps it
out["mlflow_kept"] = sys.modules["mlflow"] is mlflow and hasattr(mlflow, "start_run")
print("LEAN " + json.dumps(out))
"""


def test_deepspeed_starts_without_loading_mlflow_or_inductor():
    """engine.initialize keeps DeepSpeed's autotuner from importing mlflow and its Muon module from
    loading TorchInductor (seconds per worker start), and leaves mlflow importable and the environment
    as it was. In a fresh process: this one has imported both long ago."""
    import os
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _LEAN_START, str(29000 + os.getpid() % 1000)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("LEAN ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = json.loads(lines[-1][5:])
    assert out == {
        "first": {"zero": 2, "inductor": False, "mlflow": False, "dynamo_env": None},
        "second": {"zero": 2, "inductor": False, "mlflow": True, "dynamo_env": "0"},
        "mlflow_kept": True,
    }
