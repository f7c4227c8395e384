"""The forgetting guard's verdicts (pure logic; the stop path runs for real in test_train.py)."""

from __future__ import annotations

import json

import pytest

from vallex.train.guard import ForgettingGuard, baseline_losses, describe_trips


def _valid(**losses):
    return {lang: {"loss": v, "ar_loss": v / 2, "nar_loss": v / 2} for lang, v in losses.items()}


def test_rise_above_best_trips_and_best_only_improves():
    g = ForgettingGuard(max_rise=0.1)
    assert not ForgettingGuard.tripped(g.check(_valid(en=5.0, ar=6.0)))
    assert not ForgettingGuard.tripped(g.check(_valid(en=4.0, ar=6.5)))  # ar +8.3%: under 10%
    v = g.check(_valid(en=4.5, ar=5.0))  # en +12.5% above its best 4.0
    assert ForgettingGuard.tripped(v) == ["en"]
    assert v["en"]["reference"] == 4.0 and v["en"]["rise"] == pytest.approx(0.125)
    assert g.best == {"en": 4.0, "ar": 5.0}
    assert "en validation loss 4.500 is 12.5% above its best 4.000 (limit 10%)" in describe_trips(v)


def test_per_language_threshold_and_metric():
    g = ForgettingGuard(max_rise=0.1, per_language={"ar": 1.0}, metric="ar_loss")
    g.check(_valid(en=4.0, ar=4.0))
    v = g.check(_valid(en=4.0, ar=7.0))  # ar +75% but its own limit is 100%
    assert not v["ar"]["tripped"] and v["ar"]["max_rise"] == 1.0 and v["ar"]["loss"] == 3.5


def test_best_survives_a_resume():
    g = ForgettingGuard(max_rise=0.1, best={"en": 2.0})
    assert ForgettingGuard.tripped(g.check(_valid(en=3.0))) == ["en"]


def test_baseline_report(tmp_path):
    p = tmp_path / "report.json"
    p.write_text(json.dumps({"languages": {"en": {"last": {"loss": 3.0, "ar_loss": 1.0}}}}))
    assert baseline_losses(str(p), "loss") == {"en": 3.0}
    g = ForgettingGuard(max_rise=0.2, baseline=baseline_losses(str(p), "loss"))
    v = g.check(_valid(en=3.5, zh=9.0))
    assert v["en"]["reference_from"] == "baseline" and not v["en"]["tripped"]  # +16.7%
    assert v["zh"]["reference_from"] == "best"
    with pytest.raises(FileNotFoundError, match="train.guard.baseline: .*missing.json does not exist"):
        baseline_losses(str(tmp_path / "missing.json"), "loss")
    p.write_text(json.dumps({"steps": 3}))
    with pytest.raises(ValueError, match="not a vallex report.json"):
        baseline_losses(str(p), "loss")


def test_a_stage_not_trained_is_not_judged():
    g = ForgettingGuard(max_rise=0.1, metric="nar_loss")
    assert g.check({"en": {"loss": 3.0, "ar_loss": 3.0, "nar_loss": None}}) == {}


def _gains(**gains):
    return {lang: {"loss": 5.0, "text_gain": g} for lang, g in gains.items()}


def test_text_gain_guard_trips_when_the_text_gain_falls():
    """Forgetting a language's words: its text gain falls while its loss may not move."""
    g = ForgettingGuard(max_rise=0.2, metric="text_gain", floor=0.05)
    # below the floor the language has not learnt to read yet: its gain is noise, not judged
    assert not ForgettingGuard.tripped(g.check(_gains(en=0.01, fr=0.02)))
    assert not ForgettingGuard.tripped(g.check(_gains(en=0.004, fr=0.3)))  # en -60% of a noise-level best
    assert not ForgettingGuard.tripped(g.check(_gains(en=0.4, fr=0.28)))  # fr -6.7%: within 20%
    assert g.best == {"en": 0.4, "fr": 0.3}  # the best text gain is the highest
    v = g.check(_gains(en=0.3, fr=0.29))  # en -25% below its best 0.4
    assert ForgettingGuard.tripped(v) == ["en"]
    assert v["en"]["rise"] == pytest.approx(0.25) and v["en"]["reference"] == 0.4
    assert "en text gain 0.300 is 25.0% below its best 0.400" in describe_trips(v)


def test_text_gain_guard_floor_and_baseline():
    # the old language read its text at step 0 (0.3); with a generous max_rise only the floor trips
    g = ForgettingGuard(max_rise=0.9, metric="text_gain", floor=0.1, baseline={"en": 0.3}, source="initial")
    assert not ForgettingGuard.tripped(g.check(_gains(en=0.12)))
    v = g.check(_gains(en=0.08))
    assert ForgettingGuard.tripped(v) == ["en"] and v["en"]["reference_from"] == "initial"
    assert v["en"]["floor"] == 0.1


def test_per_guard_trips_when_the_phoneme_error_rate_rises():
    g = ForgettingGuard(max_rise=0.5, metric="per")
    assert not ForgettingGuard.tripped(g.check({"en": {"loss": 5.0, "per": 0.2}}))
    assert not ForgettingGuard.tripped(g.check({"en": {"loss": 5.0, "per": 0.28}}))  # +40%
    v = g.check({"en": {"loss": 5.0, "per": 0.35}, "fr": {"loss": 5.0}})  # +75%; fr: no PER, not judged
    assert ForgettingGuard.tripped(v) == ["en"] and set(v) == {"en"}
    assert "en phoneme error rate 0.350 is 75.0% above its best 0.200" in describe_trips(v)


def test_a_nan_loss_trips_the_guard_and_does_not_disarm_it():
    g = ForgettingGuard(max_rise=0.1)
    g.check(_valid(en=4.0, ar=5.0))
    v = g.check(_valid(en=float("nan"), ar=5.0))
    assert ForgettingGuard.tripped(v) == ["en"] and v["en"]["nonfinite"] and v["en"]["rise"] is None
    assert "en validation loss is nan (not a finite number)" in describe_trips(v)
    assert g.best == {"en": 4.0, "ar": 5.0}  # NaN is no one's best
    # The reference is still a number: a later finite rise trips as before (old code: best NaN, never).
    assert ForgettingGuard.tripped(g.check(_valid(en=4.8, ar=5.0))) == ["en"]
    first = ForgettingGuard(max_rise=0.1)
    assert ForgettingGuard.tripped(first.check(_valid(en=float("inf")))) == ["en"] and first.best == {}
    assert ForgettingGuard.tripped(first.check(_valid(en=4.0))) == []
    assert ForgettingGuard.tripped(first.check(_valid(en=4.5))) == ["en"]
