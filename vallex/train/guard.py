"""The forgetting guard: notice the moment a language starts to be forgotten.

What it watches is ``train.guard.metric``: a validation loss (lower is better), the text gain (how much
the model reads its text, higher is better: forgetting a language's words shows as its text gain
falling while its loss, the codes' acoustic statistics, may hardly move), or the phoneme error rate of
synthesized speech (lower is better). See ``vallex.eval.intelligibility``.

After every evaluation each language's validation loss is compared with a reference: the best loss
this run has seen for it, the language's final loss in an earlier run's ``report.json``, or — when the
run starts from a trained model (``train.init_from``) — the loss the model had at step 0, before this
run trained it (so adding a language is judged against the model it started from). A rise of more than ``max_rise`` (relative)
trips the guard: the driver prints a loud warning, and with ``action: stop`` every rank stops after
checkpointing. The validation losses are all-reduced, so every rank reaches the same verdict and stops
at the same step: no rank is left waiting in a collective.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def baseline_losses(path: str, metric: str) -> dict[str, float]:
    """Per-language reference losses from an earlier run's report.json (its last evaluation)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"train.guard.baseline: {p} does not exist (expected an earlier run's report.json)"
        )
    try:
        languages = json.loads(p.read_text())["languages"]
        return {lang: float(v["last"][metric]) for lang, v in languages.items()}
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        raise ValueError(
            f"train.guard.baseline: {p} is not a vallex report.json with languages.<lang>.last.{metric} ({e})"
        ) from None


HIGHER_IS_BETTER = ("text_gain",)
METRIC_WORDS = {
    "loss": "validation loss",
    "ar_loss": "AR validation loss",
    "nar_loss": "NAR validation loss",
    "text_gain": "text gain",
    "per": "phoneme error rate",
}


class ForgettingGuard:
    """Tracks the reference value per language and judges each evaluation.

    ``rise`` is always the relative change for the worse: ``(value - ref) / ref`` for a loss or PER,
    ``(ref - value) / ref`` for the text gain (a fall). A PER reference of 0 makes any error a trip.
    """

    def __init__(
        self,
        max_rise: float,
        per_language: dict[str, float] | None = None,
        baseline: dict[str, float] | None = None,
        metric: str = "loss",
        best: dict[str, float] | None = None,
        source: str = "baseline",
        floor: float = 0.05,
    ):
        self.max_rise = max_rise
        self.per_language = dict(per_language or {})
        self.baseline = dict(baseline or {})
        self.metric = metric
        self.best: dict[str, float] = dict(best or {})  # restored from a checkpoint on resume
        self.source = source  # what the baseline losses are: "baseline" (a report.json) or "initial"
        self.floor = floor  # text gain: judged once the reference reaches it, trips below it
        self.higher_is_better = metric in HIGHER_IS_BETTER

    def threshold(self, lang: str) -> float:
        return self.per_language.get(lang, self.max_rise)

    def check(self, valid: dict[str, dict]) -> dict[str, dict]:
        """Verdict per language: reference, value, relative change for the worse, whether it tripped."""
        verdict = {}
        for lang, v in sorted(valid.items()):
            if v.get(self.metric) is None:  # not measured (a stage not trained, no recognizer): not judged
                continue
            value = float(v[self.metric])
            if lang in self.baseline:
                ref, source = self.baseline[lang], self.source
            else:
                ref, source = self.best.get(lang, value), "best"
            if not math.isfinite(value):  # a NaN/inf figure is the worst news, never "no change"
                verdict[lang] = {
                    "reference": ref,
                    "reference_from": source,
                    "loss": value,
                    "metric": self.metric,
                    "rise": None,
                    "max_rise": self.threshold(lang),
                    "tripped": True,
                    "nonfinite": True,
                }
                continue  # and it is never anyone's best: the reference stays a number
            finite = math.isfinite(ref)
            if self.higher_is_better:
                judged = finite and ref >= self.floor and ref > 0
                rise = (ref - value) / ref if judged else 0.0
                tripped = judged and (rise > self.threshold(lang) or value < self.floor)
            else:
                if ref > 0 and finite:
                    rise = (value - ref) / ref
                else:
                    rise = math.inf if (self.metric == "per" and ref == 0 and value > 0) else 0.0
                tripped = rise > self.threshold(lang)
            verdict[lang] = {
                "reference": ref,
                "reference_from": source,
                "loss": value,  # the watched value (named "loss" by older reports)
                "metric": self.metric,
                "rise": rise,
                "max_rise": self.threshold(lang),
                "tripped": bool(tripped),
            }
            if self.higher_is_better and self.floor > 0:
                verdict[lang]["floor"] = self.floor
            better = max if self.higher_is_better else min
            self.best[lang] = better(self.best.get(lang, value), value)
        return verdict

    @staticmethod
    def tripped(verdict: dict[str, dict]) -> list[str]:
        return [lang for lang, v in verdict.items() if v["tripped"]]


def describe_trips(verdict: dict[str, dict]) -> str:
    out = []
    for lang, v in verdict.items():
        if not v["tripped"]:
            continue
        metric = v.get("metric", "loss")
        word = METRIC_WORDS.get(metric, metric)
        if v.get("nonfinite") or v["rise"] is None:
            text = f"{lang} {word} is {v['loss']} (not a finite number)"
        elif metric in HIGHER_IS_BETTER:
            text = (
                f"{lang} {word} {v['loss']:.3f} is {v['rise'] * 100:.1f}% below its {v['reference_from']} "
                f"{v['reference']:.3f} (limit {v['max_rise'] * 100:.0f}%, floor {v.get('floor', 0):.3f})"
            )
        else:
            text = (
                f"{lang} {word} {v['loss']:.3f} is {v['rise'] * 100:.1f}% above its {v['reference_from']} "
                f"{v['reference']:.3f} (limit {v['max_rise'] * 100:.0f}%)"
            )
        out.append(text)
    return "; ".join(out)
