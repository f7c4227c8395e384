"""Text gain, synthesized-speech PER and listening samples (vallex.eval), in-process without Ray.

The figures must be right, not just present: a model that cannot see its text has a text gain of 0
(float noise), a model trained where codes are a function of the phonemes reads its text (large gain),
and the evaluation gives the same numbers every time.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from vallex.config import load_config
from vallex.data.collate import collate
from vallex.data.schema import SHARD_SCHEMA
from vallex.eval.intelligibility import Intelligibility, synthesis_plan
from vallex.eval.text_gain import derangement, mismatched_table
from vallex.model.vallex import VallexConfig, VallexModel
from vallex.train.loop import _validation_batches, evaluate
from vallex.train.plan import RunPlan

Q, K = 2, 32  # codebooks and codebook size of the small readable corpus


def readable_table(lang: str, n: int, seed: int, speakers: int = 2) -> pa.Table:
    """Rows whose codes are a function of the phonemes: 3 frames per phoneme, code = f(phoneme, frame)."""
    assert Q == 2
    rng = np.random.default_rng(seed)
    phonemes, codes, frames = [], [], []
    for _ in range(n):
        p = rng.integers(4, 14, size=int(rng.integers(3, 7))).astype(np.int32)
        t = np.arange(3 * len(p))
        # codebook 1 tells phoneme pairs apart (p // 2), codebook 2 the phoneme within its pair: the
        # NAR too must read the text to predict it
        c = np.stack([(p[t // 3] // 2) * 3 + t % 3, 16 + (p[t // 3] % 2) * 3 + t % 3]).astype(np.int16)
        phonemes.append(p)
        codes.append(c.reshape(-1))
        frames.append(len(t))
    return pa.table(
        {
            "utt_id": [f"{lang}-{i:03d}" for i in range(n)],
            "speaker": [f"{lang}-spk{i % speakers}" for i in range(n)],
            "language": [lang] * n,
            "text": [f"{lang} sentence {i}" for i in range(n)],
            "phonemes": pa.array(phonemes, type=pa.list_(pa.int32())),
            "codes": pa.array(codes, type=pa.list_(pa.int16())),
            "frames": pa.array(frames, type=pa.int32()),
            "num_codebooks": pa.array(np.full(n, Q), type=pa.int8()),
            "duration": pa.array(np.asarray(frames) / 75, type=pa.float32()),
            "split": ["valid"] * n,
        },
        schema=SHARD_SCHEMA,
    )


def _cfg(*overrides):
    return load_config(None, ["train.batch_size=8", "train.intelligibility.samples=false", *overrides])


def _info(tables, model) -> RunPlan:
    """The run plan the workers would get, for a model over ``tables``' languages."""
    import dataclasses

    langs = tuple(sorted(tables))
    return RunPlan(
        prepared_dir="",
        languages=langs,
        eval_languages=langs,
        init_languages=(),
        model_languages=langs,
        counts={},
        weights={},
        budget_rows=0,
        model_config=dataclasses.asdict(model.config),
        size="tiny",
        num_symbols=model.config.num_phonemes,
        num_codebooks=model.config.num_codebooks,
        seed=0,
        valid_max_rows=0,
        storage_path="",
    )


def _tiny(num_languages: int = 1, **kw) -> VallexModel:
    torch.manual_seed(0)
    cfg = dict(d_model=32, nhead=2, num_layers=1, num_phonemes=16, num_languages=num_languages)
    cfg.update(num_codebooks=Q, codebook_size=K, dropout=0.0, **kw)
    return VallexModel(VallexConfig(**cfg))


def _evaluate(model, tables, cfg) -> dict:
    """What the training loop does at an evaluation, on one process."""
    info = _info(tables, model)
    batches = _validation_batches(tables, info.language_ids, info.num_codebooks, 8, 0, 1)
    filler = batches[info.languages[0]][0]
    valid = evaluate(model, batches, list(info.languages), torch.device("cpu"), "both", filler)
    intel = Intelligibility(cfg, tables, info, 0, 1, model, None)
    intel.evaluate(model, valid, torch.device("cpu"), filler, step=1)
    return valid


class TextBlind(VallexModel):
    """A model whose transformers never see the phonemes (one constant token instead), while everything
    else, the NAR's content-hashed stage and prefix included, still reads the real batch."""

    @staticmethod
    def _blind(b):
        B = b.phonemes.shape[0]
        return b._replace(
            phonemes=torch.full((B, 1), 4, dtype=torch.long), text_valid=torch.ones(B, 1, dtype=torch.bool)
        )

    def _ar(self, b):
        return super()._ar(self._blind(b))

    def _nar(self, b, stage, prefix):
        return super()._nar(self._blind(b), stage, prefix)


# ------------------------------------------------------------------------------------ derangement


def test_derangement_has_no_fixed_point_and_is_fixed_by_its_seed():
    for n in (2, 3, 5, 17, 100):
        for seed in range(5):
            p = derangement(n, seed, "en")
            assert sorted(p.tolist()) == list(range(n))  # a permutation
            assert not (p == np.arange(n)).any()  # nobody keeps their own text
            assert (derangement(n, seed, "en") == p).all()  # identical on every call (every rank)
    assert any((derangement(20, 0, "en") != derangement(20, 0, "fr")).tolist())  # per language
    assert any((derangement(20, 0, "en") != derangement(20, 1, "en")).tolist())  # per seed
    with pytest.raises(ValueError, match="at least 2"):
        derangement(1, 0)


def test_mismatched_table_swaps_only_the_phonemes():
    table = readable_table("en", 9, 0)
    swapped = mismatched_table(table, 0, "en")
    perm = derangement(9, 0, "en")
    assert swapped.column("phonemes").to_pylist() == [table.column("phonemes")[int(j)].as_py() for j in perm]
    for col in ("utt_id", "codes", "frames", "speaker", "language"):
        assert swapped.column(col).equals(table.column(col))


# ------------------------------------------------------------------------------------ text gain


def test_text_gain_is_zero_for_a_model_that_cannot_see_its_text():
    tables = {lang: readable_table(lang, 11, i) for i, lang in enumerate(("en", "fr"))}
    torch.manual_seed(0)
    model = TextBlind(_tiny(2).config)
    valid = _evaluate(model, tables, _cfg())
    for lang, v in valid.items():
        assert v["ar_loss"] > 1.0 and v["nar_loss"] > 1.0  # an untrained model: large losses...
        assert abs(v["ar_text_gain"]) < 1e-5, (lang, v)  # ...but nothing changes with the text
        assert abs(v["nar_text_gain"]) < 1e-5, (lang, v)
        assert v["text_gain"] == v["ar_text_gain"]


def _train(model, table, steps: int, seed: int = 0) -> VallexModel:
    rows = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(steps):
        idx = rng.choice(table.num_rows, 16, replace=False)
        out = model(collate({c: v[idx] for c, v in rows.items()}, {"en": 0}, Q))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    return model.eval()


def test_text_gain_is_large_once_a_model_reads_and_the_evaluation_is_deterministic(one_thread):
    """Codes are a function of the phonemes: a model that has learnt them gains a lot from the true
    text; before training it gains next to nothing."""
    tables = {"en": readable_table("en", 12, 99)}
    model = _tiny()
    before = _evaluate(model, tables, _cfg())["en"]
    _train(model, readable_table("en", 400, 1), steps=STEPS)
    after = _evaluate(model, tables, _cfg())["en"]
    print(before, after)
    assert after["ar_loss"] < before["ar_loss"] - 1.0
    assert after["ar_text_gain"] > 0.3 and after["nar_text_gain"] > 0.1
    assert abs(before["ar_text_gain"]) < 0.2
    # the same model, tables and seed: the same figures, to the bit
    assert _evaluate(model, tables, _cfg())["en"] == after


STEPS = 80


# ------------------------------------------------------------------------------- synthesis plan


def test_synthesis_plan_is_fixed_and_prompts_with_the_same_speaker():
    tables = {
        "en": readable_table("en", 10, 0, speakers=3),
        "fr": readable_table("fr", 3, 1, speakers=3),  # every speaker once: prompts from another one
        "ar": readable_table("ar", 1, 2),  # no other utterance to prompt with
    }
    items, skipped = synthesis_plan(tables, 4, seed=7)
    assert items == synthesis_plan(tables, 4, seed=7)[0]  # identical on every rank and evaluation
    assert items != synthesis_plan(tables, 4, seed=8)[0]
    assert set(skipped) == {"ar"} and "prompt" in skipped["ar"]
    en = [it for it in items if it.lang == "en"]
    fr = [it for it in items if it.lang == "fr"]
    assert [it.k for it in en] == [0, 1, 2, 3] and len(fr) == 3
    speakers = tables["en"].column("speaker").to_pylist()
    for it in en:
        assert it.prompt_row != it.row and speakers[it.prompt_row] == speakers[it.row] and it.same_speaker
    assert all(it.prompt_row != it.row and not it.same_speaker for it in fr)
    assert len({it.seed for it in items}) == len(items)  # each utterance its own sampling seed


def test_synthesis_is_seeded_bounded_and_independent_of_the_number_of_workers():
    """Every evaluation decodes the same utterances with the same random numbers; a rank's share of the
    subset does not change what each utterance becomes."""
    tables = {"en": readable_table("en", 8, 3)}
    model = _tiny()
    cfg = _cfg("train.intelligibility.per_utterances=4", "train.intelligibility.max_length_ratio=1.5")
    info = _info(tables, model)
    one = Intelligibility(cfg, tables, info, 0, 1, model, None)
    one.items = synthesis_plan(tables, 4, cfg.run.seed)[0]  # as with a recognizer: the whole subset
    codes = {it: one._synthesize(model, it) for it in one.mine()}
    assert len(codes) == 4
    frames = tables["en"].column("frames").to_pylist()
    for it, c in codes.items():
        assert c.shape[0] == Q and 1 <= c.shape[1] <= int(np.ceil(1.5 * frames[it.row]))
        assert (one._synthesize(model, it) == c).all()
    two = [Intelligibility(cfg, tables, info, r, 2, model, None) for r in (0, 1)]
    for t in two:
        t.items = one.items
    shares = [t.mine() for t in two]
    assert sorted(shares[0] + shares[1], key=lambda it: it.k) == one.items  # split, nothing twice
    assert all(it.k % 2 == 0 for it in shares[0])  # item 0 (the listening sample) on rank 0
    for it in shares[1]:
        assert (two[1]._synthesize(model, it) == codes[it]).all()


# --------------------------------------------------------------------------- where the figures go


def _record(step, gains, pers=None):
    valid = {}
    for lang, g in gains.items():
        v = {"loss": 5.0 - step / 100, "ar_loss": 3.0, "nar_loss": 2.0, "ar_top10": 0.5, "nar_top10": 0.5}
        v.update({"text_gain": g, "ar_text_gain": g, "nar_text_gain": g / 2})
        if pers:
            v.update({"per": pers[lang], "per_floor": 0.1})
        valid[lang] = v
    return {"step": step, "train_loss": 4.0, "lr": 1e-3, "valid": valid, "samples_per_s": 3.0}


def test_text_gain_and_per_are_shown_wherever_the_losses_are(tmp_path):
    from vallex.train.metrics import build_report, flat_metrics, format_record, loss_table, plot_losses

    records = [
        _record(1, {"en": 0.01, "fr": 0.0}, {"en": 0.9, "fr": 0.95}),
        _record(50, {"en": 0.35, "fr": 0.2}, {"en": 0.3, "fr": 0.5}),
        _record(100, {"en": 0.30, "fr": 0.25}, {"en": 0.4, "fr": 0.45}),
    ]
    line = format_record(records[-1], 100)
    assert "text gain en 0.30 fr 0.25" in line and "PER en 40%/10% fr 45%/10%" in line
    flat = flat_metrics(records[-1])
    assert flat["text_gain/en"] == 0.30 and flat["nar_text_gain/fr"] == 0.125 and flat["per/fr"] == 0.45
    assert flat["per_floor/en"] == 0.1 and flat["text_gain_min"] == 0.25 and flat["per_max"] == 0.45
    report = build_report(records, {})
    en = report["languages"]["en"]
    assert en["text_gain"] == {"first": 0.01, "best": 0.35, "best_step": 50, "last": 0.30}
    assert en["per"] == {"first": 0.9, "best": 0.3, "best_step": 50, "last": 0.4, "floor": 0.1}
    table = loss_table(records)
    assert "text gain first" in table and "PER first" in table
    assert table.splitlines()[2].split() == [
        "en",
        "4.990",
        "4.000",
        "-19.8%",
        "0.010",
        "0.300",
        "90%",
        "40%",
        "10%",
    ]
    plot_losses(records, tmp_path / "valid_loss.png")
    assert (tmp_path / "valid_loss.png").stat().st_size > 1000
    # a run without them (text gain off, no recognizer) shows what it has, as before
    plain = [
        {**r, "valid": {k: {**v, "text_gain": None, "per": None} for k, v in r["valid"].items()}}
        for r in records
    ]
    assert "text gain" not in format_record(plain[-1], 100) and "PER" not in format_record(plain[-1], 100)
    assert "text_gain" not in build_report(plain, {})["languages"]["en"]


def test_a_guard_on_an_unmeasured_figure_is_a_config_error():
    from vallex.config import ConfigError

    with pytest.raises(ConfigError, match="train.guard.metric: per is not measured.*per_utterances > 0"):
        load_config(None, ["train.guard.metric=per", "train.intelligibility.per_utterances=0"])
    with pytest.raises(ConfigError, match="train.guard.metric: text_gain is not measured"):
        load_config(None, ["train.guard.metric=text_gain", "train.intelligibility.text_gain=false"])
    assert load_config(None, ["train.guard.metric=text_gain"]).train.guard.floor == 0.05


# ------------------------------------------------------------------ validation bounded per worker


def _worker(tmp_path, rank: int, world: int, model, cfg, cap: int = 0, extra=None):
    """``WorkerRun._read_validation`` on an in-process stand-in for rank ``rank`` of ``world``."""
    from types import SimpleNamespace

    from vallex.data.corpus import PreparedCorpus, split_source
    from vallex.data.synthetic import write_synthetic_corpus
    from vallex.train.loop import WorkerRun

    root = tmp_path / "corpus"
    if not root.exists():  # several shards per language, 8-row groups mixing train and valid rows
        kw = dict(frames=(4, 10), phonemes=(3, 6), num_codebooks=Q, num_symbols=16, code_values=K)
        write_synthetic_corpus(
            root, {"en": 40, "fr": 25}, valid_per_language=37, rows_per_shard=30, row_group_rows=8, **kw
        )
    corpus = PreparedCorpus.open(root)
    tables = {lang: corpus.read_split(lang, "valid") for lang in corpus.languages}
    run = SimpleNamespace(
        plan=_info(tables, model), cfg=cfg, rank=rank, world=world, model_engine=SimpleNamespace(module=model)
    )
    WorkerRun._read_validation(run, split_source(corpus, corpus.languages, "valid", cap), extra)
    return run, corpus


def _groups_of(corpus, lang: str, rows) -> set[tuple[str, int]]:
    """(shard path, row group) of each position in the language's validation split."""
    shards = corpus.shards(lang)
    where = [
        (shards[s], g)
        for s, groups in enumerate(corpus.group_rows(lang, "valid"))
        for g, n in enumerate(groups)
        for _ in range(n)
    ]
    return {where[int(i)] for i in rows}


def test_a_worker_reads_only_the_row_groups_of_the_validation_rows_it_scores(tmp_path, monkeypatch):
    """Each rank scores a contiguous block of each language's validation rows and reads every column
    only of the row groups holding them (and of the rows it synthesizes); of the other rows only the
    light columns text gain and the synthesis plan need."""
    import pyarrow.parquet as pq

    from vallex.data.corpus import LIGHT_COLUMNS, rank_block

    reads = []

    class Spy(pq.ParquetFile):
        def __init__(self, source, *a, **kw):
            super().__init__(source, *a, **kw)
            self.spy_path = str(source)

        def read_row_groups(self, row_groups, columns=None, **kw):
            reads.append((self.spy_path, tuple(row_groups), columns))
            return super().read_row_groups(row_groups, columns=columns, **kw)

    model = _tiny(2, num_phonemes=16)
    for samples in (False, True):  # with samples, rank 0 synthesizes each language's first item
        cfg = _cfg(f"train.intelligibility.samples={str(samples).lower()}")
        for world in (1, 3, 4):
            for rank in range(world):
                reads.clear()
                monkeypatch.setattr(pq, "ParquetFile", Spy)
                run, corpus = _worker(tmp_path, rank, world, model, cfg)
                monkeypatch.undo()
                heavy = {(path, g) for path, groups, cols in reads if cols is None for g in groups}
                assert all(set(c) <= {*LIGHT_COLUMNS, "split"} for _, _, c in reads if c is not None)
                want = set()
                items = run.intelligibility.mine()
                assert bool(items) == (samples and rank == 0)
                for lang in corpus.languages:
                    block = set(rank_block(37, rank, world).tolist())
                    synth = {i for it in items if it.lang == lang for i in (it.row, it.prompt_row)}
                    want |= _groups_of(corpus, lang, block | synth)
                    codes = run.intelligibility.rows[lang]["codes"]
                    assert all(codes[i] is not None for i in block | synth)
                    assert all(codes[i] is None for i in set(range(37)) - block - synth)
                    if world > 1 and not synth:  # a block is a fraction of the split's row groups
                        assert _groups_of(corpus, lang, block) < _groups_of(corpus, lang, range(37))
                assert heavy == want, (samples, world, rank)


def test_per_language_losses_summed_over_rank_blocks_equal_one_worker(tmp_path):
    """What the all-reduce adds up: each rank's per-language sums over its block (validation and
    mismatched-text passes) give one worker's figures, up to float summation order; every row is scored
    once; a rank without rows of its own (more ranks than rows) still has a real filler batch."""
    from vallex.eval.losses import EVAL_FIELDS

    model = _tiny(2, num_phonemes=16).eval()
    cfg = _cfg("train.batch_size=5")
    cpu = torch.device("cpu")

    def sums(run, batches):
        langs = list(run.plan.eval_languages)
        out = evaluate(model, batches, langs, cpu, "both", run.filler)
        return {
            lang: np.array(
                [(v[f"{s}_loss"] or 0.0) * v[f"{s}_tokens"] for s in ("ar", "nar")]
                + [(v[f"{s}_top10"] or 0.0) * v[f"{s}_tokens"] for s in ("ar", "nar")]
                + [v["ar_tokens"], v["nar_tokens"]]
            )
            for lang, v in out.items()
        }

    for cap, world in ((0, 3), (4, 6)):  # 6 ranks for 4 rows a language: two score nothing
        n = cap or 37
        one, corpus = _worker(tmp_path, 0, 1, model, cfg, cap)
        want = {"valid": sums(one, one.valid_batches), "mis": sums(one, one.intelligibility.mismatched)}
        assert len(EVAL_FIELDS) == 6 and all(v[4] > 0 for v in want["valid"].values())
        got = {"valid": {}, "mis": {}}
        rows = {lang: 0 for lang in corpus.languages}
        for rank in range(world):
            run, _ = _worker(tmp_path, rank, world, model, cfg, cap)
            assert run.filler["codes"].numel() > 0  # a real batch, read by this rank
            for key, batches in (("valid", run.valid_batches), ("mis", run.intelligibility.mismatched)):
                for lang, v in sums(run, batches).items():
                    got[key][lang] = got[key].get(lang, 0) + v
            for lang, batches in run.valid_batches.items():
                rows[lang] += sum(len(b["code_lens"]) for b in batches)
        assert rows == {lang: n for lang in corpus.languages}
        for key in ("valid", "mis"):
            for lang, v in want[key].items():
                where = f"{key} {lang} world {world}"
                assert (got[key][lang][4:] == v[4:]).all(), where  # the same tokens scored
                # a batch sums its rows' float32 losses before the float64 all-reduce: float32 order
                np.testing.assert_allclose(got[key][lang], v, rtol=1e-6, err_msg=where)
