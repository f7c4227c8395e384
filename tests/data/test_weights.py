"""Sampling weights: known numbers for each policy, and an error naming the key for each bad input."""

from __future__ import annotations

import json
import math

import pytest

from vallex.data.weights import resolve_weights, unimax

COUNTS = {"en": 1000, "zh": 250, "ar": 10}


def approx(d: dict, **kw):
    return pytest.approx(d, abs=1e-12, **kw)


def test_uniform_and_proportional():
    assert resolve_weights("uniform", COUNTS) == approx({"en": 1 / 3, "zh": 1 / 3, "ar": 1 / 3})
    assert resolve_weights("proportional", COUNTS) == approx(
        {"en": 1000 / 1260, "zh": 250 / 1260, "ar": 10 / 1260}
    )


def test_temperature_interpolates_between_uniform_and_proportional():
    assert resolve_weights("temperature", COUNTS, alpha=0.0) == approx(resolve_weights("uniform", COUNTS))
    assert resolve_weights("temperature", COUNTS, alpha=1.0) == approx(
        resolve_weights("proportional", COUNTS)
    )
    # alpha=0.5: sqrt(1000), sqrt(250), sqrt(10) = 31.62, 15.81, 3.16 -> normalized
    roots = {k: math.sqrt(v) for k, v in COUNTS.items()}
    total = sum(roots.values())
    assert resolve_weights("temperature", COUNTS, alpha=0.5) == approx(
        {k: v / total for k, v in roots.items()}
    )


def test_unimax_caps_small_languages_and_redistributes():
    # budget 1200 rows, 3 languages: even share 400 each; ar is capped at 4 epochs x 10 = 40,
    # its unused 360 split evenly between zh and en (580 each); zh's cap is 1000, so no more caps.
    rows = unimax(COUNTS, budget=1200, max_epochs=4)
    assert rows == pytest.approx({"en": 580, "zh": 580, "ar": 40})
    assert resolve_weights("unimax", COUNTS, budget=1200) == approx(
        {"en": 580 / 1200, "zh": 580 / 1200, "ar": 40 / 1200}
    )
    # A cap that hits a mid-size language too: budget 3000 -> ar 40, zh min(1480, 1000) = 1000, en 1960.
    assert unimax(COUNTS, budget=3000, max_epochs=4) == pytest.approx({"en": 1960, "zh": 1000, "ar": 40})


def test_unimax_budget_above_every_cap_is_proportional():
    assert resolve_weights("unimax", COUNTS, budget=10**9, unimax_epochs=2) == approx(
        resolve_weights("proportional", COUNTS)
    )


def test_explicit_map_is_normalized_and_missing_languages_get_zero():
    assert resolve_weights({"en": 3, "ar": 1}, COUNTS) == approx({"en": 0.75, "zh": 0.0, "ar": 0.25})


def test_tune_best_weights_file(tmp_path):
    path = tmp_path / "best_weights.json"
    path.write_text(json.dumps({"weights": {"en": 0.2, "zh": 0.2, "ar": 0.6}, "objective": 1.23}))
    assert resolve_weights(str(path), COUNTS) == approx({"en": 0.2, "zh": 0.2, "ar": 0.6})
    assert resolve_weights(path, COUNTS) == approx({"en": 0.2, "zh": 0.2, "ar": 0.6})


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"en": -1.0}, r"weight for 'en' is -1.0; weights must be >= 0"),
        ({"en": float("nan")}, r"weight for 'en' is nan; weights must be finite"),
        ({"en": float("inf")}, r"weight for 'en' is inf; weights must be finite"),
        ({"en": 0, "zh": 0.0}, r"all weights are 0"),
        ({"fr": 1.0}, r"weight for 'fr', a language without shards here; available: \['ar', 'en', 'zh'\]"),
        ({"en": "high"}, r"weight for 'en' must be a number"),
        ("temprature", r"unknown weights policy 'temprature'; did you mean 'temperature'\?"),
        ("banana", r"unknown weights policy 'banana'; use one of"),
    ],
)
def test_bad_weights_name_the_key(spec, match):
    with pytest.raises(ValueError, match=match):
        resolve_weights(spec, COUNTS)


@pytest.mark.parametrize("policy", ["uniform", "proportional", "temperature"])
def test_policy_refuses_a_language_without_rows(policy):
    with pytest.raises(ValueError, match=r"0 train rows: \['zh'\]"):
        resolve_weights(policy, {"en": 10, "zh": 0})


def test_explicit_weight_on_a_language_without_rows():
    with pytest.raises(ValueError, match=r"'zh' has weight 2 but 0 train rows"):
        resolve_weights({"en": 1, "zh": 2}, {"en": 10, "zh": 0})
    assert resolve_weights({"en": 1, "zh": 0}, {"en": 10, "zh": 0}) == approx({"en": 1.0, "zh": 0.0})


def test_unimax_needs_a_budget():
    with pytest.raises(ValueError, match=r"'unimax' needs budget > 0 \(total training rows"):
        resolve_weights("unimax", COUNTS)


def test_weights_file_errors(tmp_path):
    with pytest.raises(ValueError, match=r"weights file '.*missing.json' does not exist"):
        resolve_weights(str(tmp_path / "missing.json"), COUNTS)
    bad = tmp_path / "best.json"
    bad.write_text(json.dumps({"best": {"en": 1}}))
    with pytest.raises(ValueError, match=r'best.json: needs a top-level "weights" key .* found \[\'best\'\]'):
        resolve_weights(str(bad), COUNTS)
    bad.write_text(json.dumps({"weights": {"en": -2}}))
    with pytest.raises(ValueError, match=r"best.json: weights: weight for 'en' is -2"):
        resolve_weights(str(bad), COUNTS)
