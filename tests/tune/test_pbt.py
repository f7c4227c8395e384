"""Population Based Training over the language weights (vallex.tune.pbt, tune.scheduler=pbt).

- the explore step on the simplex, in-process;
- PBT end to end on the real Ray Tune and Ray Train + DeepSpeed: a population of 2 tiny trials, one
  exploit, the schedules and the outputs.
"""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

import pytest

from vallex.config import ConfigError, load_config
from vallex.data.synthetic import write_synthetic_corpus
from vallex.tune import space as spaces
from vallex.tune.pbt import Explore


@pytest.mark.parametrize("space", ["stick", "logits", "temperature"])
def test_perturb_stays_on_the_simplex_above_the_floor_and_moves(space):
    langs = ["ar", "en", "fr", "zh"]
    counts = {"ar": 100, "en": 900, "fr": 500, "zh": 300}
    rng = random.Random(0)
    lo, hi = (-spaces.LOGIT_RANGE, spaces.LOGIT_RANGE) if space == "logits" else (0.0, 1.0)
    moved = []
    for _ in range(200):
        params = {n: lo + (hi - lo) * rng.random() for n in spaces.param_names(space, langs)}
        new, how = spaces.perturb(
            space, params, langs, rng, sigma=0.3, resample=0.0, min_weight=0.05, counts=counts
        )
        assert how != "resampled"
        before = spaces.to_weights(space, params, langs, 0.05, counts)
        after = spaces.to_weights(space, new, langs, 0.05, counts)
        assert sum(after.values()) == pytest.approx(1.0) and min(after.values()) >= 0.05 - 1e-12
        moved.append(max(abs(after[k] - before[k]) for k in langs))
    # a perturbation is a small step, not a jump across the simplex, and not nothing
    assert 0.005 < sorted(moved)[len(moved) // 2] < 0.15, sorted(moved)[len(moved) // 2]
    # resample = 1: a fresh draw from the space
    new, how = spaces.perturb(space, params, langs, rng, sigma=0.3, resample=1.0, counts=counts)
    assert how == "resampled" and set(new) == set(params)


def test_stick_perturbation_is_multiplicative_on_the_shares():
    """Two languages, no floor: the log-ratio of the shares moves by the difference of two N(0, s)
    draws, i.e. with standard deviation s * sqrt(2)."""
    rng = random.Random(1)
    params = spaces.to_params("stick", {"a": 0.2, "b": 0.8}, ["a", "b"])
    steps = []
    for _ in range(4000):
        new, _ = spaces.perturb("stick", params, ["a", "b"], rng, sigma=0.3, resample=0.0)
        w = spaces.to_weights("stick", new, ["a", "b"])
        steps.append(math.log(w["a"] / w["b"]) - math.log(0.2 / 0.8))
    mean = sum(steps) / len(steps)
    sd = math.sqrt(sum((s - mean) ** 2 for s in steps) / len(steps))
    assert abs(mean) < 0.03 and sd == pytest.approx(0.3 * math.sqrt(2), rel=0.05)


def test_explore_is_deterministic_per_call_and_keeps_other_keys(tmp_path):
    setup = {"space": "stick", "languages": ["en", "zh"], "min_weight": 0.01, "counts": {"en": 4, "zh": 2}}
    a, b = Explore(setup, 0.3, 0.0, seed=5), Explore(setup, 0.3, 0.0, seed=5)
    config = {"stick_en": 0.4, "other": "kept"}
    first = a(config)
    assert first == b(config) and first["other"] == "kept" and first["stick_en"] != 0.4
    assert a(config) != first  # the next call draws other noise
    # what Tune pickles into its experiment state: plain data
    assert all(isinstance(v, (str, int, float, list, dict)) for v in vars(a).values())


def test_pbt_config_errors():
    with pytest.raises(ConfigError, match="tune.num_samples"):
        load_config(None, ["tune.scheduler=pbt", "tune.num_samples=1"])
    with pytest.raises(ConfigError, match="tune.pbt_interval"):
        load_config(None, ["tune.max_steps_per_trial=4", "tune.pbt_interval=4"])
    with pytest.raises(ConfigError, match="tune.pbt_quantile"):
        load_config(None, ["tune.pbt_quantile=0.6"])


@pytest.mark.ray
def test_pbt_end_to_end_a_trial_continues_from_the_others_checkpoint_with_perturbed_weights(
    ray_cluster, tmp_path, caplog
):
    from vallex.tune.search import run_search

    write_synthetic_corpus(
        tmp_path / "prepare",
        {"en": 40, "zh": 24},
        valid_per_language=4,
        frames=(15, 30),
        code_values={"en": 32},
    )
    cfg = load_config(
        None,
        [
            f"run.output_dir={tmp_path}",
            "run.name=pbt",
            "model.size=tiny",
            "data.window_rows=32",
            # one worker a trial: 0.9 + 1 (Ray Data) + 0.01 (driver) = 1.91 CPUs, both trials at once on 4
            "train.num_workers=1",
            "train.cpus_per_worker=0.9",
            "train.zero_stage=2",
            "train.batch_size=4",
            "train.warmup_steps=1",
            "train.intelligibility.samples=false",
            "train.intelligibility.text_gain=false",
            "tune.scheduler=pbt",
            "tune.num_samples=2",
            "tune.max_steps_per_trial=4",
            "tune.pbt_interval=2",
            "tune.eval_every=2",
            "tune.baselines=[]",
            "tune.reference={en: 9.0, zh: 12.0}",
            "tune.max_failures=0",
        ],
    )
    caplog.set_level(logging.INFO, logger="vallex")
    best = run_search(cfg)
    out = tmp_path / "tune"
    log_text = caplog.text

    population = json.loads((out / "pbt_schedules.json").read_text())
    trials = population["trials"]
    assert len(trials) == 2 and population["exploits"] == 1, population
    # Synchronous PBT with 2 trials: at step 2 the worse one clones the better one, once.
    (clone_id,) = [t for t, v in trials.items() if any(s.get("cloned_from") for s in v["schedule"])]
    (source_id,) = set(trials) - {clone_id}
    source, clone = trials[source_id]["schedule"], trials[clone_id]["schedule"]
    assert [(s["trial_id"], s["from_step"], s["to_step"]) for s in source] == [
        (source_id, 0, 2),
        (source_id, 2, 4),
    ]
    assert source[0]["weights"] == source[1]["weights"]  # not exploited: its weights stay
    # The clone's schedule: the source's first segment (inherited with its checkpoint), then its own,
    # at weights perturbed from the source's.
    assert clone[0] == source[0], clone
    assert (clone[1]["trial_id"], clone[1]["from_step"], clone[1]["to_step"]) == (clone_id, 2, 4)
    assert clone[1]["cloned_from"] == source_id
    assert clone[1]["weights"] != source[0]["weights"] and sum(clone[1]["weights"].values()) == pytest.approx(
        1
    )
    assert min(clone[1]["weights"].values()) >= cfg.tune.min_weight - 1e-9
    assert f"continues at step 2 from trial {source_id}'s checkpoint (exploit)" in log_text, log_text
    assert "pbt explore (" in log_text

    # The clone's second segment is a real Train run that started at step 2 from the source's model:
    # its only evaluation is step 4, and it trained at the perturbed weights.
    segments = out / "trials" / clone_id
    seg = max(segments.glob("seg-*"))
    records = [json.loads(line) for line in (seg / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4], [r["step"] for r in records]
    report = json.loads((seg / "train" / "report.json").read_text())
    assert report["weights"] == pytest.approx(clone[1]["weights"])
    assert report["model_file"] == trials[clone_id]["model"] and Path(report["model_file"]).is_file()
    # the rows it drew add to the source's at step 2 (the mixing counters came with the checkpoint)
    source_seg0 = out / "trials" / source_id / "seg-000" / "train" / "metrics.jsonl"
    at_2 = json.loads(source_seg0.read_text().splitlines()[-1])
    assert at_2["step"] == 2 and at_2["samples_seen"] == 8 and records[-1]["samples_seen"] == 16
    # its own first segment was trained and then left behind: a real run at its initial weights
    own_first = json.loads((segments / "seg-000" / "train" / "report.json").read_text())
    assert own_first["steps"] == 2

    # best_weights.json: what data.weights takes (the best trial's final weights), its schedule and model
    assert best["source"] == "search" and best["search"]["scheduler"] == "pbt"
    assert best["search"]["exploits"] == 1 and best["search"]["complete"] == 2
    assert best["schedule"] == trials[best["trial_id"]]["schedule"]
    assert best["weights"] == pytest.approx(trials[best["trial_id"]]["final_weights"])
    assert best["weights"] == pytest.approx(best["schedule"][-1]["weights"])
    assert Path(best["model"]).is_file()
    objectives = {t: v["objective"] for t, v in trials.items()}
    assert best["objective"]["value"] == objectives[best["trial_id"]]
    assert best["objective"]["value"] <= min(objectives.values()) * (1 + cfg.tune.tie_tolerance)
    assert (out / "pbt_schedules.png").stat().st_size > 5000
    saved = json.loads((out / "best_weights.json").read_text())
    assert saved["weights"] == best["weights"]

    # The same command again resumes the finished experiment: its saved state (the scheduler and its
    # explore step, the random searcher, every trial's checkpoint) passes the resume check
    # (vallex.tune.state_check), and nothing is trained again.
    caplog.clear()
    again = run_search(cfg)
    assert "resuming pbt-tune-pbt" in caplog.text, caplog.text
    assert " started: " not in caplog.text and "continues at" not in caplog.text, caplog.text
    assert again["weights"] == best["weights"] and again["schedule"] == best["schedule"]
