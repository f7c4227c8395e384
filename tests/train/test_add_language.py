"""Adding a language to a trained model: growth leaves old languages untouched, naive mode trains only the
new language, the forgetting report's fields and verdicts, and a tiny end-to-end run (Ray Train, 1 worker,
DeepSpeed ZeRO-2) through what the demo runs: its base model (``train_base``), then ``add_language.py
--compare`` adding a language naively and with vallex from it, and the demo's comparison table, JSON and
figure written from those two real runs."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch

from vallex.config import load_config
from vallex.data.synthetic import symbols_fingerprint, write_synthetic_corpus
from vallex.train.add_language import (
    AddLanguageError,
    AddLanguagePlan,
    forgetting_report,
    plan_add_language,
    plot_forgetting,
    replay_weights,
    report_table,
)
from vallex.train.add_language_compare import comparison_table

ROOT = Path(__file__).resolve().parents[2]
OLD = {"en": 40, "fr": 24}
NEW = {
    "zh": 12
}  # sorts after the old ones: the synthetic generator gives en/fr the same rows in both corpora
EXTRA_SYMBOLS = 5  # the new language's "new phonemes": the add-language corpus's table extends the base's


def _cfg(out: Path, prepared: Path, *overrides: str):
    return load_config(
        None,
        [
            f"run.output_dir={out}",
            f"run.prepared_dir={prepared}",
            "run.name=t",
            "model.size=tiny",
            "model.dropout=0.0",
            "train.num_workers=1",  # three runs here: one worker each (two-worker runs: test_train.py)
            "train.cpus_per_worker=0.5",
            "train.zero_stage=2",
            "train.batch_size=4",
            "train.max_steps=4",
            "train.warmup_steps=1",
            "train.eval_every=2",
            "train.checkpoint_every=4",
            "train.lr=3.0e-3",
            "data.window_rows=32",
            "train.intelligibility.samples=false",  # no listening samples: not what this test is about
            "train.intelligibility.text_gain=false",  # nor text gain (a second validation pass)
            *overrides,
        ],
    )


def _extend_symbols(prepared: Path, extra: int) -> None:
    """Append symbols to a synthetic corpus's table (as preparing a new language does) and bump its version."""
    table = json.loads((prepared / "symbols.json").read_text())
    table["symbols"] += [f"new{i}" for i in range(extra)]
    table["version"] += 1
    (prepared / "symbols.json").write_text(json.dumps(table))
    manifest = json.loads((prepared / "manifest.json").read_text())
    manifest["symbols_version"] = table["version"]
    manifest.pop("symbols_fingerprint", None)
    (prepared / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("addlang")
    write_synthetic_corpus(root / "prep-base", OLD, valid_per_language=4, frames=(15, 35))
    write_synthetic_corpus(root / "prep", {**OLD, **NEW}, valid_per_language=4, frames=(15, 35))
    _extend_symbols(root / "prep", EXTRA_SYMBOLS)
    return root


@pytest.fixture(scope="module")
def base(ray_cluster, corpora):
    """A base model trained on the old languages only, as the demo trains its own: train/model.pt and report."""
    from vallex.train.add_language_compare import train_base

    cfg = _cfg(corpora / "unused", corpora / "unused")  # train_base sets the folders, languages and steps
    report = train_base(cfg, out=corpora / "base", prepared_dir=corpora / "prep-base", languages=OLD, steps=6)
    assert report["steps"] == 6 and sorted(report["languages"]) == sorted(OLD)
    return Path(report["model_file"]), report


# ------------------------------------------------------------------------------------ no Ray needed


@pytest.fixture(scope="module")
def saved_base(corpora):
    """A vallex checkpoint of an untrained tiny model that knows en and fr (the base corpus's symbols)."""
    from vallex.data.corpus import PreparedCorpus
    from vallex.model.checkpoint import save_checkpoint
    from vallex.model.vallex import build_model

    old_corpus = PreparedCorpus.open(corpora / "prep-base")
    torch.manual_seed(1)
    model = build_model("tiny", num_phonemes=old_corpus.num_symbols, num_languages=2, dropout=0.0).eval()
    path = corpora / "saved" / "model.pt"
    save_checkpoint(model, path, languages=["en", "fr"], symbols=old_corpus.symbols, symbols_version=1)
    return path, model, old_corpus


def test_growing_embeddings_leaves_old_language_outputs_unchanged(corpora, saved_base, one_thread):
    """The model the trainer starts from (train.init_from: grown languages and phonemes) gives every old
    language exactly the outputs the base model gave, before any training."""
    import numpy as np

    from vallex.data.collate import collate
    from vallex.data.corpus import PreparedCorpus
    from vallex.model.vallex import VallexConfig, VallexModel
    from vallex.train.plan import plan_and_initial_state

    path, model, old_corpus = saved_base

    cfg = _cfg(corpora / "grow", corpora / "prep", f"train.init_from={path}", "data.languages=[en,fr,zh]")
    corpus = PreparedCorpus.open(cfg.prepared_dir)
    plan, init_state = plan_and_initial_state(cfg, corpus=corpus)
    assert list(plan.model_languages) == ["en", "fr", "zh"]  # old ids kept, the new language appended
    assert plan.model_config["num_phonemes"] == old_corpus.num_symbols + EXTRA_SYMBOLS
    grown = VallexModel(VallexConfig(**plan.model_config)).eval()
    grown.load_state_dict(init_state)
    assert sorted(plan.eval_languages) == ["en", "fr", "zh"]

    for lang in ("en", "fr"):
        table = corpus.read_split(lang, "valid")
        batch = collate(
            {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names},
            plan.language_ids,
            corpus.num_codebooks,
        )
        with torch.no_grad():
            before, after = model(batch), grown(batch)
            logits_before, logits_after = model.ar_logits(batch), grown.ar_logits(batch)
        for key in before:
            assert torch.equal(before[key], after[key]), (lang, key)
        assert torch.equal(logits_before, logits_after)
    # The new rows exist and start at the mean of the old ones.
    emb = grown.ar_language_embedding.word_embeddings.weight
    assert torch.allclose(emb[2], emb[:2].mean(0))
    text = grown.ar_text_embedding.word_embeddings.weight
    assert text.shape[0] == old_corpus.num_symbols + EXTRA_SYMBOLS
    assert np.allclose(text[-1].detach().numpy(), text[: old_corpus.num_symbols].mean(0).detach().numpy())


def test_replay_weights_split_the_stream_between_old_and_new():
    w = replay_weights({"en": 400, "fr": 100, "ar": 20}, ["en", "fr"], ["ar"], 0.6, alpha=0.5)
    assert sum(w.values()) == pytest.approx(1.0)
    assert w["ar"] == pytest.approx(0.4) and w["en"] + w["fr"] == pytest.approx(0.6)
    assert w["en"] == pytest.approx(2 * w["fr"])  # temperature 0.5 within the old group: sqrt(4) = 2
    with pytest.raises(AddLanguageError, match="--naive"):
        replay_weights({"en": 1, "ar": 1}, ["en"], ["ar"], 0.0, alpha=0.5)


def _plan_cfg(corpora, *overrides):
    return _cfg(corpora / "plans", corpora / "prep", *overrides)


def test_plan_checks_name_the_problem(corpora, saved_base):
    model_file = saved_base[0]
    cfg = _plan_cfg(corpora)
    with pytest.raises(AddLanguageError, match=r"\['ja'\] have no prepared shards in .*manifest.json"):
        plan_add_language(cfg, base=model_file, new_languages=["ja"], out_dir=corpora / "x")
    with pytest.raises(AddLanguageError, match=r"\['en'\] already belong to the base model"):
        plan_add_language(cfg, base=model_file, new_languages=["en"], out_dir=corpora / "x")
    with pytest.raises(AddLanguageError, match="does not exist"):
        plan_add_language(cfg, base=corpora / "nope.pt", new_languages=["zh"], out_dir=corpora / "x")
    with pytest.raises(AddLanguageError, match="cannot go with --naive"):
        plan_add_language(
            cfg, base=model_file, new_languages=["zh"], out_dir=corpora / "x", mode="naive", replay_ratio=0.5
        )
    # A corpus whose symbol table is not an extension of the model's: ids would mean other phonemes.
    other = write_synthetic_corpus(corpora / "prep-other", {**OLD, **NEW}, num_symbols=30)
    table = json.loads((other / "symbols.json").read_text())
    table["symbols"][5] = "changed"
    (other / "symbols.json").write_text(json.dumps(table))
    manifest = json.loads((other / "manifest.json").read_text())  # a corpus consistent in itself
    manifest["symbols_fingerprint"] = symbols_fingerprint(table["symbols"])
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        AddLanguageError,
        match=r"model.pt: the symbol table .* nor an extension of it \(first difference at id 5\)",
    ):
        plan_add_language(
            _cfg(corpora / "plans", other), base=model_file, new_languages=["zh"], out_dir=corpora / "x"
        )

    plan = plan_add_language(
        cfg, base=model_file, new_languages=["zh"], out_dir=corpora / "x", replay_ratio=0.5
    )
    assert plan.old_languages == ["en", "fr"] and plan.trained_languages == ["en", "fr", "zh"]
    assert plan.new_phonemes == EXTRA_SYMBOLS
    assert plan.config.train.init_from == str(model_file.resolve())
    assert plan.config.data.weights["zh"] == pytest.approx(0.5)
    naive = plan_add_language(cfg, base=model_file, new_languages=["zh"], out_dir=corpora / "y", mode="naive")
    assert naive.trained_languages == ["zh"] and naive.config.data.languages == ["zh"]
    # Runs in other folders (or from other bases) never share a Ray Train run name: no cross-resume.
    assert (
        naive.config.run.name
        != plan_add_language(
            cfg, base=model_file, new_languages=["zh"], out_dir=corpora / "z", mode="naive"
        ).config.run.name
    )

    # A Tune best_weights.json of the old languages only would train the new one at weight 0.
    tuned = corpora / "best_weights.json"
    tuned.write_text(json.dumps({"weights": {"en": 0.6, "fr": 0.4}}))
    with pytest.raises(AddLanguageError, match=r"gives the new language\(s\) \['zh'\] no weight"):
        plan_add_language(
            _plan_cfg(corpora, f"data.weights={tuned}"),
            base=model_file,
            new_languages=["zh"],
            out_dir=corpora / "x",
        )


def _record(step, losses, fractions=None):
    valid = {lang: {"loss": v, "ar_loss": v / 2, "nar_loss": v / 2} for lang, v in losses.items()}
    return {
        "step": step,
        "train_loss": None if step == 0 else 1.0,
        "valid": valid,
        "realized_fractions": fractions,
    }


def test_report_fields_and_verdicts(tmp_path):
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "train.guard.per_language={fr: 0.5}"])
    plan = AddLanguagePlan(
        mode="naive",
        base="base.pt",
        out_dir=str(tmp_path),
        old_languages=["en", "fr", "zh"],
        new_languages=["ar"],
        trained_languages=["ar"],
        unwatched=[],
        weights="uniform",
        replay_ratio=None,
        new_phonemes=3,
        config=cfg,
    )
    records = [
        _record(0, {"ar": 10.0, "en": 8.0, "fr": 8.0, "zh": 8.0}, {"ar": 1.0}),
        _record(5, {"ar": 7.0, "en": 9.0, "fr": 9.0, "zh": 8.0}, {"ar": 1.0}),
        _record(10, {"ar": 6.0, "en": 12.0, "fr": 11.0, "zh": 8.8}, {"ar": 1.0}),
    ]
    guard = {"verdict": "forgetting", "trips": [{"step": 10, "languages": ["en"]}], "max_rise": 0.2}
    rep = forgetting_report(records, {"guard": guard, "weights": {"ar": 1.0}}, plan)

    assert rep["baseline_step"] == 0 and rep["final_step"] == 10 and rep["mode"] == "naive"
    en, fr, zh, ar = (rep["languages"][k] for k in ("en", "fr", "zh", "ar"))
    assert en == {
        "role": "old",
        "trained": False,
        "baseline": 8.0,
        "final": 12.0,
        "relative_change": pytest.approx(0.5),
        "best": 8.0,
        "best_step": 0,
        "max_rise": 0.2,
        "verdict": "forgotten",
        "guard_trips": [10],
    }
    assert fr["max_rise"] == 0.5 and fr["verdict"] == "kept"  # +37.5% is within its own 50% limit
    assert zh["relative_change"] == pytest.approx(0.1) and zh["verdict"] == "kept"
    assert ar["role"] == "new" and ar["trained"] and ar["verdict"] == "learned"
    assert ar["relative_change"] == pytest.approx(-0.4)
    assert [p["step"] for p in rep["new_language_curve"]["ar"]] == [0, 5, 10]
    assert [p["loss"] for p in rep["new_language_curve"]["ar"]] == [10.0, 7.0, 6.0]
    assert rep["forgotten"] == ["en"] and rep["verdict"] == "forgetting"
    assert rep["guard"]["verdict"] == "forgetting" and rep["new_phoneme_symbols"] == 3
    json.dumps(rep)  # plain JSON

    kept = forgetting_report(records[:2], {"guard": {"verdict": "ok", "trips": []}}, plan)
    assert kept["verdict"] == "ok" and kept["forgotten"] == []
    with pytest.raises(AddLanguageError, match="no step-0 evaluation"):
        forgetting_report(records[1:], {"guard": guard}, plan)

    plot_forgetting([rep, kept], tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 5000
    table = comparison_table(rep, kept)
    assert "| en | old | 8.000 | 12.000 | +50.0% (forgotten) |" in table


# ------------------------------------------------------------------------------------ end to end (Ray)


def _main():
    return runpy.run_path(str(ROOT / "ray_jobs" / "add_language.py"), run_name="vallex_test")["main"]


@pytest.fixture(scope="module")
def runs(base, corpora):
    """The base model extended with zh in both modes by one ``add_language.py --compare`` (the demo's
    comparison on the user's own base and corpus): <out>/naive, <out>/vallex, the comparison beside them."""
    model_file, _ = base
    out = corpora / "compare"
    args = [
        "--config",
        str(ROOT / "job.yaml"),
        f"--base={model_file}",
        "--new=zh",
        f"--out={out}",
        "--compare",
        "--replay-ratio=0.5",  # the vallex run's mix; the naive one trains zh alone
        f"--figure={corpora / 'docs' / 'add_language.png'}",
        f"run.output_dir={corpora / 'unused'}",
        f"run.prepared_dir={corpora / 'prep'}",
        "model.dropout=0.0",
        "train.num_workers=1",
        "train.cpus_per_worker=0.5",
        "train.batch_size=4",
        "train.max_steps=4",
        "train.warmup_steps=1",
        "train.eval_every=2",
        "train.checkpoint_every=4",
        "data.window_rows=32",
        "train.intelligibility.samples=false",  # no listening samples: not what this test is about
        "train.intelligibility.text_gain=false",  # nor text gain (a second validation pass): the table's
    ]  # text gain and PER columns are checked on records in test_report_shows_text_gain_and_per...
    rc = _main()(args)
    reports = {
        mode: json.loads((out / mode / "forgetting_report.json").read_text()) for mode in ("naive", "vallex")
    }
    # The exit status says whether the contrast showed: vallex kept the old languages, naive forgot them.
    shown = reports["vallex"]["verdict"] == "ok" and reports["naive"]["verdict"] == "forgetting"
    assert rc == (0 if shown else 1)
    return {
        "naive": out / "naive",
        "vallex": out / "vallex",
        "compare": out,
        "figure": corpora / "docs" / "add_language.png",
    }


def test_end_to_end_vallex_mode(runs, base):
    _, base_report = base
    rep = json.loads((runs["vallex"] / "forgetting_report.json").read_text())
    assert (runs["vallex"] / "forgetting.png").stat().st_size > 5000
    assert rep["mode"] == "vallex" and rep["old_languages"] == ["en", "fr"] and rep["new_languages"] == ["zh"]
    assert rep["trained_languages"] == ["en", "fr", "zh"] and rep["new_phoneme_symbols"] == EXTRA_SYMBOLS
    assert set(rep["languages"]) == {"en", "fr", "zh"}
    for lang, v in rep["languages"].items():
        assert v["relative_change"] == pytest.approx((v["final"] - v["baseline"]) / v["baseline"])
        assert v["verdict"] in (("kept", "forgotten") if lang != "zh" else ("learned", "not learned"))
    assert rep["verdict"] in ("ok", "forgetting") and rep["guard"]["verdict"] in ("ok", "forgetting")
    assert [p["step"] for p in rep["new_language_curve"]["zh"]] == [0, 1, 2, 4]
    assert rep["languages"]["zh"]["final"] < rep["languages"]["zh"]["baseline"]  # the new language learns
    # The mix holds the old and new languages, half and half by the replay ratio.
    fr = rep["realized_fractions"]
    assert set(fr) == {"en", "fr", "zh"} and fr["zh"] == pytest.approx(0.5, abs=0.15)
    # Step 0 is the grown base model, before any update: the old languages score exactly what the base
    # model scored at the end of its own training (same weights, same validation rows).
    for lang in ("en", "fr"):
        assert rep["languages"][lang]["baseline"] == pytest.approx(
            base_report["languages"][lang]["last"]["loss"], rel=1e-5
        )
    # The run's model file knows every language, old ids first.
    from vallex.model.checkpoint import load_checkpoint

    _, meta = load_checkpoint(rep["model_file"])
    assert meta["languages"] == ["en", "fr", "zh"]


def test_naive_mode_trains_on_the_new_language_only(runs):
    from vallex.train.metrics import read_metrics

    rep = json.loads((runs["naive"] / "forgetting_report.json").read_text())
    assert rep["mode"] == "naive" and rep["trained_languages"] == ["zh"]
    records = read_metrics(runs["naive"] / "train" / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 4]
    for r in records[1:]:
        assert r["realized_fractions"] == {"zh": 1.0}  # every training row was zh
        assert set(r["valid"]) == {"en", "fr", "zh"}  # ...while every language is still evaluated
    assert records[-1]["samples_seen"] == 1 * 4 * 4  # 1 worker x 4 rows x 4 steps
    assert json.loads((runs["naive"] / "train" / "weights.json").read_text())["weights"] == {"zh": 1.0}
    assert {v["trained"] for k, v in rep["languages"].items() if k != "zh"} == {False}
    # The old languages' baselines are the same in both modes: one base model, one step-0 evaluation each.
    vallex = json.loads((runs["vallex"] / "forgetting_report.json").read_text())
    for lang in ("en", "fr"):
        assert rep["languages"][lang]["baseline"] == pytest.approx(vallex["languages"][lang]["baseline"])
    # (Whether naive mode forgets more is not asserted here: synthetic codes carry no language-specific
    # structure to forget, and in 4 steps both modes mostly learn the shared code prior. The demo's
    # real speech shows the contrast: README "The headline result".)


def test_comparison_written_from_the_two_real_runs(runs):
    """What the demo writes after its runs (comparison.md, comparison.json, the figure and its copy),
    here from the naive and vallex runs of one base: every number in the table is a report's."""
    out = runs["compare"]
    naive, vallex = (
        json.loads((runs[m] / "forgetting_report.json").read_text()) for m in ("naive", "vallex")
    )
    assert json.loads((out / "comparison.json").read_text()) == {"naive": naive, "vallex": vallex}
    md = (out / "comparison.md").read_text()
    assert "after 4 steps" in md and "Validation AR + NAR loss" in md
    lines = md.splitlines()
    assert "| language | role | baseline (step 0) | naive: final | naive: change | vallex: final |" in md
    assert "text gain" not in lines[2] and "PER" not in lines[2]  # neither measured: no such columns
    assert "Text gain:" not in md and "No synthesized PER: no recognizer" in md  # nor notes about them
    for lang in ("en", "fr", "zh"):
        n, v = naive["languages"][lang], vallex["languages"][lang]
        assert n["baseline"] == pytest.approx(v["baseline"])  # one base model, one step-0 evaluation
        assert (
            f"| {lang} | {v['role']} | {v['baseline']:.3f} "
            f"| {n['final']:.3f} | {n['relative_change'] * 100:+.1f}% ({n['verdict']}) "
            f"| {v['final']:.3f} | {v['relative_change'] * 100:+.1f}% ({v['verdict']}) |"
        ) in lines, (lang, md)
    assert f"| guard | | | | {naive['guard']['verdict']} | | {vallex['guard']['verdict']} |" in lines
    png = (out / "add_language.png").read_bytes()
    assert len(png) > 5000 and runs["figure"].read_bytes() == png  # --figure: a copy of the same figure


def test_command_line_refuses_what_cannot_work_before_ray(corpora, saved_base, capsys):
    """add_language.py's single-mode and --compare requests are checked before Ray starts (exit 2)."""
    cli = [f"run.output_dir={corpora / 'cli'}", f"run.prepared_dir={corpora / 'prep'}"]
    main = _main()
    assert main(["--base", str(saved_base[0]), "--new", "zh", "--naive", "--compare", *cli]) == 2
    assert "--compare runs both modes: drop --naive" in capsys.readouterr().err
    assert main(["--demo", "--compare", *cli]) == 2
    assert main(["--new", "zh", *cli]) == 2
    assert "--base FILE and --new LANGS are required" in capsys.readouterr().err
    for extra in ([], ["--compare"]):
        assert main(["--base", str(saved_base[0]), "--new", "ja", *extra, *cli]) == 2
        assert "['ja'] have no prepared shards" in capsys.readouterr().err
    (corpora / "mine.jsonl").write_text("")
    assert (
        main(["--demo", f"corpus.source={corpora / 'mine.jsonl'}", *cli]) == 2
    )  # the demo's own corpus only
    assert "--demo uses the embedded demo corpus" in capsys.readouterr().err


def test_report_shows_text_gain_and_per_and_judges_a_falling_text_gain(tmp_path):
    """Gibberish: the old language's loss hardly moves but it stops reading its text."""
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "train.guard.metric=text_gain"])
    plan = AddLanguagePlan(
        mode="naive",
        base="base.pt",
        out_dir=str(tmp_path),
        old_languages=["en"],
        new_languages=["ar"],
        trained_languages=["ar"],
        unwatched=[],
        weights="uniform",
        replay_ratio=None,
        new_phonemes=0,
        config=cfg,
    )
    records = [_record(0, {"ar": 10.0, "en": 8.0}), _record(10, {"ar": 6.0, "en": 8.1})]
    for r, (en_gain, ar_gain, en_per) in zip(records, ((0.4, 0.0, 0.3), (0.1, 0.2, 0.8)), strict=True):
        r["valid"]["en"].update({"text_gain": en_gain, "per": en_per, "per_floor": 0.2})
        r["valid"]["ar"].update({"text_gain": ar_gain})
    rep = forgetting_report(records, {"guard": {"verdict": "forgetting", "trips": []}}, plan)
    en, ar = rep["languages"]["en"], rep["languages"]["ar"]
    assert en["baseline"] == 0.4 and en["final"] == 0.1 and en["verdict"] == "forgotten"  # -75%
    assert en["text_gain"] == {"baseline": 0.4, "final": 0.1}
    assert en["per"] == {"baseline": 0.3, "final": 0.8, "floor": 0.2}
    assert ar["verdict"] == "learned" and "per" not in ar  # the gain rose from 0
    table = report_table(rep)
    assert "text gain" in table and "PER" in table
    assert "0.400 -> 0.100" in table and "30% -> 80%" in table

    # The demo's comparison: step 0 -> naive / vallex, for text gain and synthesized PER (with its floor).
    vallex_records = [_record(0, {"ar": 10.0, "en": 8.0}), _record(10, {"ar": 7.0, "en": 7.9})]
    for r, (en_gain, en_per) in zip(vallex_records, ((0.4, 0.3), (0.45, 0.35)), strict=True):
        r["valid"]["en"].update({"text_gain": en_gain, "per": en_per, "per_floor": 0.2})
        r["valid"]["ar"].update({"text_gain": 0.0 if r["step"] == 0 else 0.3})
    plan.mode, plan.trained_languages = "vallex", ["ar", "en"]
    kept = forgetting_report(vallex_records, {"guard": {"verdict": "ok", "trips": []}}, plan)
    lines = comparison_table(rep, kept).splitlines()
    assert lines[0].endswith(
        "| text gain: step 0 → naive / vallex | synthesized PER: step 0 → naive / vallex |"
    )
    assert lines[1] == "|---|---|---:|---:|---:|---:|---:|---:|---:|"
    assert lines[2] == (
        "| ar | new | 0.000 | 0.200 | +nan% (learned) | 0.300 | +nan% (learned) | 0.000 → 0.200 / 0.300 | - |"
    ), lines[2]
    assert lines[3].endswith("| 0.400 → 0.100 / 0.450 | 30% → 80% / 35% (floor 20%) |"), lines[3]
    assert lines[-1] == "| guard | | | | forgetting | | ok | | |"
