"""metrics.jsonl and report.json: standard JSON, torn lines, a restart's timeline (in-process)."""

from __future__ import annotations

import json
import math

import pytest

from vallex.train.loop import nonfinite_losses
from vallex.train.metrics import build_report, cut_metrics, loss_table, read_metrics, strict_json


def _record(step, en=4.0, zh=5.0, train=3.0):
    def v(x):
        return {"loss": x, "ar_loss": x / 2, "nar_loss": x / 2}

    return {"step": step, "train_loss": train, "valid": {"en": v(en), "zh": v(zh)}}


def _strict(text):
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))


def test_strict_json_maps_non_finite_numbers_to_null_and_says_where():
    rec = _record(3, en=float("nan"), train=float("inf"))
    out = _strict(strict_json(rec))
    assert out["train_loss"] is None and out["valid"]["en"]["loss"] is None
    assert out["valid"]["zh"]["loss"] == 5.0
    assert out["nonfinite"] == ["train_loss", "valid.en.ar_loss", "valid.en.loss", "valid.en.nar_loss"]
    assert "nonfinite" not in _strict(strict_json(_record(1)))


def test_a_torn_last_line_is_skipped_by_readers_and_cut_on_restart(tmp_path):
    p = tmp_path / "metrics.jsonl"
    lines = [json.dumps(_record(s)) for s in (1, 3, 6, 7)]
    p.write_text("\n".join(lines) + "\n" + '{"step": 9, "train_lo')
    assert [r["step"] for r in read_metrics(p)] == [1, 3, 6, 7]  # a run still being written reads fine
    note = cut_metrics(p, 6)  # the restart resumes from step 6's checkpoint
    assert (
        note
        == f"{p}: restarting from the checkpoint of step 6: removed 1 record(s) after it and a torn last line (a write cut short)"
    )
    assert p.read_text() == "\n".join(lines[:3]) + "\n"
    assert cut_metrics(p, 6) is None  # nothing more to cut
    assert "removed 3 record(s)" in cut_metrics(p, None)  # restarted without a checkpoint: nothing kept
    assert p.read_text() == ""
    # A bad line that is not the last one is corruption, named with its line number.
    p.write_text(json.dumps(_record(1)) + "\n{oops\n" + json.dumps(_record(3)) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON record"):
        read_metrics(p)


def test_report_with_a_diverged_evaluation_is_strict_json():
    records = [_record(1, en=6.0), _record(3, en=4.0), _record(6, en=float("nan"))]
    report = build_report(records, {})
    en = report["languages"]["en"]
    assert en["best_step"] == 3 and en["best"]["loss"] == 4.0 and en["relative_change"] is None
    assert math.isnan(en["last"]["loss"])
    out = _strict(strict_json(report, indent=2))
    assert out["languages"]["en"]["last"]["loss"] is None and "languages.en.last.loss" in out["nonfinite"]
    assert "n/a" in loss_table(records)
    only_nan = build_report([_record(1, en=float("nan"))], {})
    assert only_nan["languages"]["en"]["best"] is None


def test_nonfinite_losses_name_the_language_or_leave_it_to_the_guard():
    rec = _record(4, zh=float("inf"))
    rec["valid"]["zh"]["ar_loss"] = 2.0
    assert (
        nonfinite_losses(rec, False, "stop")
        == "step 4: the validation loss of zh (nar_loss) is not a finite number (NaN/inf)"
    )
    assert nonfinite_losses(rec, False, "guard") is None  # the guard's trip (test_guard) handles it
    assert "step 4: the training loss is not a finite number" in nonfinite_losses(_record(4), True, "guard")
    assert nonfinite_losses(_record(4), False, "stop") is None
