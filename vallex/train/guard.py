"""The forgetting guard: notice the moment a language starts to be forgotten.

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


class ForgettingGuard:
    """Tracks the reference loss per language and judges each evaluation."""

    def __init__(
        self,
        max_rise: float,
        per_language: dict[str, float] | None = None,
        baseline: dict[str, float] | None = None,
        metric: str = "loss",
        best: dict[str, float] | None = None,
        source: str = "baseline",
    ):
        self.max_rise = max_rise
        self.per_language = dict(per_language or {})
        self.baseline = dict(baseline or {})
        self.metric = metric
        self.best: dict[str, float] = dict(best or {})  # restored from a checkpoint on resume
        self.source = source  # what the baseline losses are: "baseline" (a report.json) or "initial"

    def threshold(self, lang: str) -> float:
        return self.per_language.get(lang, self.max_rise)

    def check(self, valid: dict[str, dict]) -> dict[str, dict]:
        """Verdict per language: reference, loss, relative rise, whether it tripped."""
        verdict = {}
        for lang, v in sorted(valid.items()):
            if v[self.metric] is None:  # the watched stage isn't trained in this run: nothing to judge
                continue
            loss = float(v[self.metric])
            if lang in self.baseline:
                ref, source = self.baseline[lang], self.source
            else:
                ref, source = self.best.get(lang, loss), "best"
            if not math.isfinite(loss):  # a NaN/inf loss is the worst news, never "no rise"
                verdict[lang] = {
                    "reference": ref,
                    "reference_from": source,
                    "loss": loss,
                    "rise": None,
                    "max_rise": self.threshold(lang),
                    "tripped": True,
                    "nonfinite": True,
                }
                continue  # and it is never anyone's best: the reference stays a number
            rise = (loss - ref) / ref if ref > 0 and math.isfinite(ref) else 0.0
            verdict[lang] = {
                "reference": ref,
                "reference_from": source,
                "loss": loss,
                "rise": rise,
                "max_rise": self.threshold(lang),
                "tripped": bool(rise > self.threshold(lang)),
            }
            self.best[lang] = min(self.best.get(lang, loss), loss)
        return verdict

    @staticmethod
    def tripped(verdict: dict[str, dict]) -> list[str]:
        return [lang for lang, v in verdict.items() if v["tripped"]]


def describe_trips(verdict: dict[str, dict]) -> str:
    return "; ".join(
        f"{lang} validation loss is {v['loss']} (not a finite number)"
        if v.get("nonfinite") or v["rise"] is None
        else f"{lang} validation loss {v['loss']:.3f} is {v['rise'] * 100:.1f}% above its {v['reference_from']} "
        f"{v['reference']:.3f} (limit {v['max_rise'] * 100:.0f}%)"
        for lang, v in verdict.items()
        if v["tripped"]
    )
