"""Online language weights on a known-answer mixture: learning curves whose minimax mix is computable."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from vallex.data.online import OnlineSettings, OnlineWeights

# Per language: reachable loss, amplitude, scale. loss(n) = reachable + amplitude * (1 + n / scale) ** -0.5
# after n rows: "a" is learnt fast, "b" slowly, "c" is hard (high reachable loss) but learnt at once.
CURVES = {"a": (2.0, 3.0, 200.0), "b": (3.0, 3.0, 800.0), "c": (4.0, 1.0, 100.0)}
REACHABLE = {lang: c[0] for lang, c in CURVES.items()}
ROWS, STRETCH = 20_000, 500


def loss(lang: str, rows: float) -> float:
    reach, amp, scale = CURVES[lang]
    return reach + amp * (1 + rows / scale) ** -0.5


def minimax_excess() -> float:
    """The smallest worst excess loss any fixed mix reaches in ROWS rows (all excesses equal)."""
    lo, hi = 1e-9, 10.0
    for _ in range(200):
        e = (lo + hi) / 2
        rows = sum(scale * ((amp / e) ** 2 - 1) for _, amp, scale in CURVES.values())
        lo, hi = (e, hi) if rows > ROWS else (lo, e)
    return hi


def static_excess(weights: dict[str, float]) -> float:
    return max(loss(lang, w * ROWS) - REACHABLE[lang] for lang, w in weights.items())


def train(ow: OnlineWeights, curves_losses=loss) -> dict[str, float]:
    """Rows drawn by the current weights, one update per stretch; the rows each language got."""
    rows = dict.fromkeys(CURVES, 0.0)
    weights = ow.weights
    for k in range(ROWS // STRETCH):
        for lang in rows:
            rows[lang] += weights[lang] * STRETCH
        weights = ow.update((k + 1) * 10, {lang: curves_losses(lang, n) for lang, n in rows.items()})
    return rows


def test_excess_signal_reaches_the_minimax_mix_that_static_policies_miss():
    ow = OnlineWeights(
        dict.fromkeys(CURVES, 1.0), OnlineSettings(step_size=2.0, smoothing=0.1, floor=0.1), REACHABLE
    )
    rows = train(ow)
    online = max(loss(lang, n) - REACHABLE[lang] for lang, n in rows.items())
    best = minimax_excess()
    uniform = static_excess(dict.fromkeys(CURVES, 1 / 3))
    assert online <= 1.1 * best, (online, best)
    assert online < 0.9 * uniform, (online, uniform)
    # Driven by raw losses (reference 0) the same update pours rows into the hardest language "c",
    # which cannot get better: the worst excess loss is then far from the minimax one.
    raw = OnlineWeights(
        dict.fromkeys(CURVES, 1.0),
        OnlineSettings(step_size=2.0, smoothing=0.1, floor=0.1),
        dict.fromkeys(CURVES, 0.0),
    )
    raw_rows = train(raw)
    assert raw_rows["c"] > 2 * rows["c"]
    assert max(loss(lang, n) - REACHABLE[lang] for lang, n in raw_rows.items()) > 1.2 * online


def test_floor_smoothing_and_prior_zero():
    s = OnlineSettings(step_size=50.0, smoothing=0.0, floor=0.3)
    ow = OnlineWeights({"a": 1.0, "b": 1.0, "c": 1.0, "z": 0.0}, s, {**REACHABLE, "z": 0.0})
    w = ow.update(1, {"a": 9.0, "b": 3.0, "c": 4.0, "z": 1.0})  # "a" far above its reachable loss
    assert w["z"] == 0.0  # a language the prior leaves out never gets rows
    assert math.isclose(sum(w.values()), 1.0)
    assert min(w["b"], w["c"]) >= 0.3 / 3 * (1 - 1e-9)  # the floor holds against a huge step
    assert w["a"] > 0.7
    # Smoothing pulls towards the prior: with smoothing 1 the weights are the prior whatever the losses.
    still = OnlineWeights({"a": 3.0, "b": 1.0}, OnlineSettings(smoothing=1.0, floor=0.0), {"a": 0, "b": 0})
    assert still.update(1, {"a": 1.0, "b": 50.0}) == pytest.approx({"a": 0.75, "b": 0.25})


def test_forgetting_signal_keeps_the_prior_until_a_language_gets_worse():
    ow = OnlineWeights({"a": 0.5, "b": 0.5}, OnlineSettings(signal="forgetting", floor=0.0, smoothing=0.0))
    assert ow.update(1, {"a": 5.0, "b": 6.0}) == pytest.approx({"a": 0.5, "b": 0.5})
    assert ow.update(2, {"a": 4.0, "b": 5.0}) == pytest.approx({"a": 0.5, "b": 0.5})  # both improving
    w = ow.update(3, {"a": 3.0, "b": 6.0})  # "b" rose 20% above its best: it gets more rows
    assert w["b"] > 0.54 and w["a"] < 0.46


def test_state_round_trips_through_json_and_continues_identically():
    settings = OnlineSettings(step_size=1.5, smoothing=0.05, floor=0.2)
    whole = OnlineWeights({"a": 1.0, "b": 2.0, "c": 1.0}, settings, REACHABLE)
    half = OnlineWeights({"a": 1.0, "b": 2.0, "c": 1.0}, settings, REACHABLE)
    losses = [{"a": 3 - k / 10, "b": 5 - k / 20, "c": 4.5 - k / 50} for k in range(10)]
    for k, x in enumerate(losses):
        expected = whole.update(k, x)
        if k == 4:
            half = OnlineWeights.from_dict(json.loads(json.dumps(half.to_dict())))
        assert half.update(k, x) == expected  # bit for bit: a resumed run draws the same rows
    assert [h["step"] for h in half.history] == list(range(10))


def test_bad_settings_and_losses_name_the_key():
    with pytest.raises(ValueError, match="data.online.signal"):
        OnlineSettings(signal="loss")
    with pytest.raises(ValueError, match="data.online.floor"):
        OnlineSettings(floor=1.0)
    with pytest.raises(ValueError, match=r"reference loss for every language; \['c'\]"):
        OnlineWeights({"a": 1, "c": 1}, OnlineSettings(), {"a": 1.0})
    ow = OnlineWeights({"a": 1, "b": 1}, OnlineSettings(), {"a": 1.0, "b": 1.0})
    with pytest.raises(ValueError, match=r"no validation loss for \['b'\]"):
        ow.update(1, {"a": 2.0})
    with pytest.raises(ValueError, match="not finite"):
        ow.update(1, {"a": 2.0, "b": math.nan})


# --------------------------------------------------------------------------------------------------
# stretches: the rows an online run draws (vallex.data.mixing.Stretches), in-process, no Ray
# --------------------------------------------------------------------------------------------------

STRETCH_SIZES = {"en": 300, "zh": 120, "ar": 40}
# Three stretches with other weights each (as three evaluations would set them), rows per stretch.
SCHEDULE = [
    ({"en": 0.5, "zh": 0.3, "ar": 0.2}, 96),
    ({"en": 0.2, "zh": 0.3, "ar": 0.5}, 64),
    ({"en": 0.1, "zh": 0.6, "ar": 0.3}, 80),
]


@pytest.fixture(scope="module")
def stretch_corpus(tmp_path_factory):
    from vallex.data.corpus import PreparedCorpus
    from vallex.data.synthetic import write_synthetic_corpus

    root = write_synthetic_corpus(
        tmp_path_factory.mktemp("stretch"), STRETCH_SIZES, rows_per_shard=70, row_group_rows=16, seed=3
    )
    return PreparedCorpus.open(root)


def _base(corpus, seed=0):
    from vallex.data.mixing import MixPlan, normalize_weights

    prior = normalize_weights(corpus, dict.fromkeys(STRETCH_SIZES, 1.0))
    return MixPlan.build(corpus, prior, num_rows=0, seed=seed, window_rows=24)


def _draw(stretches, weights, rows, world=2, batch=4):
    """Every rank's batches of one stretch (as the Train workers read them); then the stretch is drawn."""
    from vallex.data.mixing import numpy_batches, rank_rows

    plan = stretches.plan(weights, rows)
    per_rank = [list(numpy_batches(rank_rows(plan, r, world, batch), batch)) for r in range(world)]
    stretches.advance(plan)
    return plan, per_rank


def _ids(batches):
    return [u for b in batches for u in b["utt_id"].tolist()]


def test_each_stretch_holds_its_weights_exactly_and_ranks_share_no_row(stretch_corpus):
    from vallex.data.mixing import Stretches

    stretches = Stretches(_base(stretch_corpus))
    drawn = {lang: [] for lang in STRETCH_SIZES}
    target = dict.fromkeys(STRETCH_SIZES, 0.0)  # sum of weight x rows over the stretches so far
    for weights, rows in SCHEDULE:
        owed = dict(stretches.carry)
        plan, per_rank = _draw(stretches, weights, rows)
        # Every rank gets whole batches, the same number, and several languages per batch.
        assert [len(b) for b in per_rank] == [rows // 8, rows // 8]
        mixed = [len(set(b["language"].tolist())) for batches in per_rank for b in batches]
        assert sum(mixed) / len(mixed) > 1.8, mixed  # rows interleaved: batches of 4 mix the languages
        ids = [_ids(b) for b in per_rank]
        assert not set(ids[0]) & set(ids[1])  # rank-disjoint
        langs = Counter(lang for b in per_rank for x in b for lang in x["language"].tolist())
        # Exact: each language's rows are its weight x the stretch's rows plus what earlier stretches'
        # rounding owes it, rounded (largest remainder); over the stretches, within one row of the sum.
        expected = {lang: weights[lang] * rows + owed.get(lang, 0.0) for lang in weights}
        assert all(abs(langs[lang] - expected[lang]) < 1 for lang in weights), (langs, expected)
        assert sum(langs.values()) == rows and dict(langs) == plan.totals()
        for lang in weights:
            target[lang] += weights[lang] * rows
            assert abs(stretches.offsets[lang] - target[lang]) < 1, (lang, stretches.offsets, target)
        for b in per_rank:
            for x in b:
                for lang, u in zip(x["language"].tolist(), x["utt_id"].tolist(), strict=True):
                    drawn[lang].append(u)
    # Rounding is carried too: six short stretches at 1/3 each (8 rows: 2.67 per language) give each
    # language 16 rows, not 18/18/12 as rounding each stretch alone would.
    before = dict(stretches.offsets)
    for _ in range(6):
        plan = stretches.plan(dict.fromkeys(STRETCH_SIZES, 1 / 3), 8)
        stretches.advance(plan)
    assert {lang: stretches.offsets[lang] - before[lang] for lang in before} == dict.fromkeys(before, 16)
    # Across the stretches no row of a language is repeated before every row of it was drawn once
    # (positions carry over): each row is drawn floor(D/n) or ceil(D/n) times for D rows drawn of n.
    assert before == {lang: len(v) for lang, v in drawn.items()}
    assert len(drawn["ar"]) > STRETCH_SIZES["ar"]  # ar wraps into a second pass, en and zh do not
    for lang, ids in drawn.items():
        n, times = STRETCH_SIZES[lang], Counter(ids)
        assert len(times) == min(len(ids), n), lang
        assert max(times.values()) - min(times.values()) <= (1 if len(ids) % n else 0), lang


def test_resume_mid_run_across_a_weight_change_draws_the_same_rows(stretch_corpus):
    from vallex.data.mixing import Stretches

    whole = Stretches(_base(stretch_corpus))
    rows_whole = [_draw(whole, w, n)[1] for w, n in SCHEDULE]
    # A run stopped after stretch 1 (its state goes through a JSON checkpoint), resumed with a fresh
    # base plan: stretch 2 and 3, at their new weights, are the uninterrupted run's, row for row.
    first = Stretches(_base(stretch_corpus))
    _draw(first, *SCHEDULE[0])
    saved = json.loads(json.dumps(first.state()))
    resumed = Stretches.restore(_base(stretch_corpus), saved)
    for (w, n), expected in zip(SCHEDULE[1:], rows_whole[1:], strict=True):
        got = _draw(resumed, w, n)[1]
        assert [_ids(b) for b in got] == [_ids(b) for b in expected]
    assert resumed.state() == whole.state()
    # Without the carried positions the stretch would start each language's stream over: other rows.
    fresh = Stretches(_base(stretch_corpus))
    fresh.index = saved["index"]
    assert [_ids(b) for b in _draw(fresh, *SCHEDULE[1])[1]] != [_ids(b) for b in rows_whole[1]]
    # Another seed draws other rows (the seed fixes them).
    other = Stretches(_base(stretch_corpus, seed=1))
    assert [_ids(b) for b in _draw(other, *SCHEDULE[0])[1]] != [_ids(b) for b in rows_whole[0]]


def test_each_rank_reads_only_the_row_groups_of_its_own_rows(stretch_corpus, monkeypatch):
    """Reads do not grow with ranks: a rank opens only row groups holding rows it trains on, each once,
    and the ranks together read the one-rank plan's groups plus at most one per language at each edge
    between two ranks' shares (every rank reading every group would be ``world`` times the groups)."""
    import pyarrow.parquet as pq

    from vallex.data import mixing
    from vallex.data.mixing import Stretches, group_reader, numpy_batches, rank_rows

    group_of = {}  # utt_id -> (shard, row group)
    for lang in STRETCH_SIZES:
        for path in stretch_corpus.shards(lang):
            file = pq.ParquetFile(path)
            for g in range(file.metadata.num_row_groups):
                for u in file.read_row_group(g, columns=["utt_id"])["utt_id"].to_pylist():
                    group_of[u] = (path, g)
    reads: list[tuple[str, int]] = []
    real = mixing._open_shard

    class Counted:  # the shard as the reader opens it, counting the row groups it reads
        def __init__(self, path, file):
            self.path, self.file = path, file

        def read_row_group(self, g, columns=None):
            reads.append((self.path, g))
            return self.file.read_row_group(g, columns=columns)

    monkeypatch.setattr(mixing, "_open_shard", lambda path, opened: Counted(path, real(path, opened)))
    stretches = Stretches(_base(stretch_corpus))
    stretches.advance(stretches.plan(SCHEDULE[0][0], 96))  # the stretch starts mid-stream, mid-group
    plan = stretches.plan({"en": 0.6, "zh": 0.35, "ar": 0.05}, 192)  # no language wraps
    world, batch = 4, 4

    def read(rank, world):
        reads.clear()
        batches = list(numpy_batches(rank_rows(plan, rank, world, batch), batch))
        return _ids(batches), list(reads), batches

    whole_ids, whole_reads, _ = read(0, 1)
    assert len(whole_reads) == len(set(whole_reads))
    total, seen = 0, []
    for rank in range(world):
        ids, opened, batches = read(rank, world)
        assert len(ids) == 48 and not set(ids) & set(seen)  # whole batches, rank-disjoint
        seen += ids
        assert sum(len(set(b["language"].tolist())) for b in batches) / len(batches) > 1.8  # mixed
        assert len(opened) == len(set(opened)), rank  # no group read twice
        assert set(opened) == {group_of[u] for u in ids}, rank  # only groups holding its rows
        total += len(opened)
    assert sorted(seen) == sorted(whole_ids)  # the ranks' rows together are the plan's rows
    assert total <= len(whole_reads) + len(STRETCH_SIZES) * (world - 1), (total, len(whole_reads))
    # Training keeps one reader per rank across stretches: the group where a language's rows of one
    # stretch end and those of the next begin is read once, where a reader per stretch reads it twice.
    stretches.advance(plan)
    after = stretches.plan({"en": 0.4, "zh": 0.3, "ar": 0.3}, 96)
    for kept in (False, True):
        reads.clear()
        reader = group_reader() if kept else None
        for p in (plan, after):
            list(rank_rows(p, 0, 1, batch, reader=reader))
        assert (len(reads) == len(set(reads))) == kept, (kept, reads)


def test_online_config_plan_and_reference_errors_name_the_key(tmp_path):
    from vallex.config import ConfigError, load_config
    from vallex.data.synthetic import write_synthetic_corpus
    from vallex.train.plan import plan_run

    write_synthetic_corpus(tmp_path / "prepare", {"en": 30, "zh": 10})

    def cfg(*extra):
        return load_config(None, [f"run.output_dir={tmp_path}", "data.weights=online", *extra])

    # The prior is a policy like data.weights; the settings and the reference reach every worker.
    plan = plan_run(cfg("data.online.prior=proportional", "data.online.reference={en: 3, zh: 4.5}"))
    assert plan.weights == pytest.approx({"en": 0.75, "zh": 0.25})
    assert "online sampling weights, starting at en=0.750, zh=0.250" in plan.summary()
    assert plan.online == {
        "settings": {"signal": "excess", "step_size": 1.0, "smoothing": 0.1, "floor": 0.2},
        "reference": {"en": 3.0, "zh": 4.5},
    }
    # A reference run's report.json: each language's best loss.
    report = tmp_path / "report.json"
    report.write_text(
        json.dumps({"languages": {"en": {"best": {"loss": 5.5}}, "zh": {"best": {"loss": 6.0}}}})
    )
    assert plan_run(cfg(f"data.online.reference={report}")).online["reference"] == {"en": 5.5, "zh": 6.0}
    tuned = tmp_path / "best_weights.json"  # Tune's solo references
    tuned.write_text(json.dumps({"weights": {"en": 1}, "objective": {"reference": {"en": 4.0, "zh": 5}}}))
    assert plan_run(cfg(f"data.online.reference={tuned}")).online["reference"] == {"en": 4.0, "zh": 5.0}
    assert plan_run(cfg("data.online.signal=forgetting")).online["reference"] is None
    with pytest.raises(ValueError, match=r"signal=excess needs data.online.reference"):
        plan_run(cfg())
    with pytest.raises(ValueError, match=r"data.online.reference: no reference loss for \['zh'\]"):
        plan_run(cfg("data.online.reference={en: 3}"))
    report.write_text(json.dumps({"languages": {"en": {"best": {"loss": 5.5}}}}))
    with pytest.raises(ValueError, match=rf"{report}: no reference loss for \['zh'\] \(it has \['en'\]\)"):
        plan_run(cfg(f"data.online.reference={report}"))
    with pytest.raises(ValueError, match=r"data.online.step_size must be a finite number > 0"):
        plan_run(cfg("data.online.reference={en: 3, zh: 4}", "data.online.step_size=0"))
    with pytest.raises(ValueError, match=r"data.online.prior: unknown weights policy 'unifrom'"):
        plan_run(cfg("data.online.prior=unifrom", "data.online.reference={en: 3, zh: 4}"))
    with pytest.raises(ConfigError, match=r"data.max_tokens: data.weights=online draws each stretch"):
        cfg("data.max_tokens=500")
    with pytest.raises(ConfigError, match=r"data.online.signal: must be one of excess, forgetting"):
        cfg("data.online.signal=loss")
    with pytest.raises(ConfigError, match=r"Did you mean 'online'"):
        load_config(None, ["data.weights=onlin"])


def test_the_record_line_tensorboard_keys_and_figure_show_the_weights(tmp_path):
    from vallex.train.metrics import flat_metrics, format_record, online_history, plot_online_weights

    def record(step, drawn, weights, signal):
        valid = {lang: {"loss": 5.0, "ar_loss": 2.5, "nar_loss": 2.5} for lang in weights}
        stretch = {"index": step // 3, "weights": drawn, "rows": {"en": 8, "zh": 4}}
        online = {"weights": weights, "signal": signal, "stretch": stretch}
        return {
            "step": step,
            "train_loss": 5.0,
            "valid": valid,
            "online": online,
            "realized_fractions": drawn,
        }

    records = [
        record(1, {"en": 0.5, "zh": 0.5}, {"en": 0.4, "zh": 0.6}, {"en": 0.1, "zh": 0.5}),
        record(3, {"en": 0.4, "zh": 0.6}, {"en": 0.31, "zh": 0.69}, {"en": 0.1, "zh": 0.4}),
    ]
    line = format_record(records[-1], 6)
    assert "next weights en:0.31 zh:0.69" in line and "mix en:0.40 zh:0.60" in line
    assert flat_metrics(records[-1])["online_weight/zh"] == 0.69
    assert [h["step"] for h in online_history(records)] == [1, 3]
    assert online_history(records)[1]["stretch"]["weights"] == {"en": 0.4, "zh": 0.6}
    assert plot_online_weights(records, tmp_path / "w.png") and (tmp_path / "w.png").stat().st_size > 1000
    assert not plot_online_weights([{**records[0], "online": None}], tmp_path / "none.png")
