"""Language weights that adapt during a run: exponentiated-gradient reweighting on per-language losses.

A static policy (``temperature``, ``unimax``) fixes the mix before the first step; a language that
turns out to lag keeps the same share for the whole run. :class:`OnlineWeights` moves the weights at
every evaluation towards the languages that are furthest from what they can reach, as DoReMi's
minimax update does (Xie et al. 2023, "DoReMi", Algorithm 1), with the safeguards that its
follow-ups found necessary (smoothing towards a prior, a floor per language):

    signal_l  = max(loss_l - reference_l, 0)         ``signal="excess"`` (the reachable loss is known)
              = max(loss_l / best_loss_l - 1, 0)      ``signal="forgetting"`` (no reference: only a
                                                      language whose loss rose above its best moves)
    logit_l  += step_size * (signal_l - mean signal)  one update per evaluation
    w         = (1 - smoothing) * softmax(logits) + smoothing * prior
    w_l       = (1 - floor) * w_l + floor / languages

Why these choices (measured on known-answer mixtures: shared/STACK.md, tests/data/test_online.py): driven by the *raw* loss, multiplicative weights pour everything into the
hardest language, whatever it can still learn; driven by the *excess* over each language's reachable
loss they settle near the mix that balances the languages' remaining progress, the same point the
``normalized_max`` Tune objective searches for. Without smoothing the weights collapse to one
language; the floor keeps every language in every stretch of the run, so none is forgotten while
another catches up. Without a reference there is no reachable loss to measure progress against (a
loss relative to the language's first one rewards, again, what cannot be learned: tried on a
known-answer mixture while choosing these signals, it ended worse than uniform weights), so
``forgetting`` leaves the prior alone until a language's loss rises above its best, then moves rows
to it: the online form of the forgetting guard.

The state is plain data (:meth:`OnlineWeights.to_dict`): a checkpoint holds it, and a resumed run
continues with the same weights. Every rank updates from the same all-reduced losses, so every rank
holds the same weights without communicating them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

SIGNALS = ("excess", "forgetting")


@dataclass(frozen=True)
class OnlineSettings:
    """How the weights move (``data.online.*``)."""

    signal: str = "excess"
    step_size: float = 1.0
    smoothing: float = 0.1
    floor: float = 0.2  # every language keeps at least floor / languages of the rows

    def __post_init__(self):
        if self.signal not in SIGNALS:
            raise ValueError(f"data.online.signal must be one of {SIGNALS}, got {self.signal!r}")
        if not (math.isfinite(self.step_size) and self.step_size > 0):
            raise ValueError(f"data.online.step_size must be a finite number > 0, got {self.step_size!r}")
        if not 0 <= self.smoothing <= 1:
            raise ValueError(f"data.online.smoothing must be in [0, 1], got {self.smoothing!r}")
        if not 0 <= self.floor < 1:
            raise ValueError(
                f"data.online.floor must be in [0, 1) (a share of the uniform weight), got {self.floor!r}"
            )


@dataclass
class OnlineWeights:
    """Weights over ``prior``'s languages, updated from per-language losses at each evaluation."""

    prior: dict[str, float]
    settings: OnlineSettings = field(default_factory=OnlineSettings)
    reference: dict[str, float] | None = None
    logits: dict[str, float] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)

    def __post_init__(self):
        total = math.fsum(self.prior.values())
        if not self.prior or total <= 0 or any(not (w >= 0) for w in self.prior.values()):
            raise ValueError(f"the prior weights must be >= 0 and not all 0, got {self.prior}")
        self.prior = {lang: w / total for lang, w in sorted(self.prior.items())}
        if self.settings.signal == "excess":
            missing = sorted(set(self.prior) - set(self.reference or {}))
            if missing:
                raise ValueError(
                    f"data.online.signal=excess needs a reference loss for every language; {missing} have "
                    "none (data.online.reference: a {language: loss} map or a report.json), or use "
                    "signal=forgetting"
                )
        # Start at the prior: logits are log-weights (a language with prior 0 never gets rows).
        if not self.logits:
            self.logits = {lang: (math.log(w) if w > 0 else -math.inf) for lang, w in self.prior.items()}

    @property
    def weights(self) -> dict[str, float]:
        """The current weights (sum 1), smoothing and floor applied."""
        top = max(self.logits.values())
        raw = {lang: math.exp(x - top) for lang, x in self.logits.items()}
        total = math.fsum(raw.values())
        c = self.settings.smoothing
        w = {lang: (1 - c) * raw[lang] / total + c * self.prior[lang] for lang in raw}
        # The floor: a share of the rows spread evenly over the languages the prior keeps.
        live = [lang for lang in w if self.prior[lang] > 0]
        f = self.settings.floor
        return {lang: ((1 - f) * v + f / len(live) if lang in live else 0.0) for lang, v in w.items()}

    def signal(self, losses: Mapping[str, float]) -> dict[str, float]:
        """Each language's signal for these losses (the larger, the more rows it gets next)."""
        missing = sorted(set(self.prior) - set(losses))
        if missing:
            raise ValueError(f"online weights: no validation loss for {missing} at this evaluation")
        bad = sorted(lang for lang in self.prior if not math.isfinite(losses[lang]))
        if bad:
            raise ValueError(f"online weights: the validation loss of {bad} is not finite: {dict(losses)}")
        if self.settings.signal == "excess":
            return {lang: max(losses[lang] - self.reference[lang], 0.0) for lang in self.prior}
        out = {}
        for lang in self.prior:
            best = self.best.get(lang, math.inf)
            out[lang] = max(losses[lang] / best - 1, 0.0) if 0 < best < math.inf else 0.0
            self.best[lang] = min(best, float(losses[lang]))
        return out

    def update(self, step: int, losses: Mapping[str, float]) -> dict[str, float]:
        """One evaluation's losses in, the weights for the next stretch of rows out."""
        s = self.signal(losses)
        live = [lang for lang in self.prior if self.prior[lang] > 0]
        mean = math.fsum(s[lang] for lang in live) / len(live)
        for lang in live:  # centred: only differences between languages move the weights
            self.logits[lang] += self.settings.step_size * (s[lang] - mean)
        weights = self.weights
        self.history.append({"step": int(step), "signal": s, "weights": weights})
        return weights

    def to_dict(self) -> dict:
        """Plain data for a checkpoint (JSON: ``-inf`` logits are stored as None)."""
        return {
            "prior": self.prior,
            "settings": vars(self.settings),
            "reference": self.reference,
            "logits": {lang: (x if math.isfinite(x) else None) for lang, x in self.logits.items()},
            "best": self.best,
            "history": self.history,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> OnlineWeights:
        logits = {lang: (-math.inf if x is None else float(x)) for lang, x in data["logits"].items()}
        return cls(
            prior=dict(data["prior"]),
            settings=OnlineSettings(**data["settings"]),
            reference=data.get("reference"),
            logits=logits,
            best=dict(data.get("best") or {}),
            history=list(data.get("history") or []),
        )


def resolve_reference(spec: str | Mapping[str, float], languages, signal: str) -> dict[str, float] | None:
    """``data.online.reference`` as ``{language: reachable loss}`` for ``languages`` (None for
    ``signal=forgetting``, which uses none): a map; a reference run's ``report.json``, whose
    ``languages.<lang>.best.loss`` (the lowest validation loss it reached, AR+NAR) is taken; or a Tune
    ``best_weights.json`` whose ``objective.reference`` holds each language's solo run's loss."""
    if signal != "excess":
        return None
    if not spec:
        raise ValueError(
            "data.online.signal=excess needs data.online.reference: each language's reachable validation "
            "loss, as a map {en: 5.1, ar: 6.0} or the report.json of a reference run (e.g. one trained at "
            "the prior weights); or use data.online.signal=forgetting, which needs none"
        )
    if isinstance(spec, Mapping):
        source, found = "data.online.reference", {str(k): v for k, v in spec.items()}
    else:
        path = Path(spec)
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise ValueError(f"data.online.reference: cannot read {path} ({e.strerror or e})") from None
        except json.JSONDecodeError as e:
            raise ValueError(
                f"data.online.reference: {path} is not JSON ({e.msg}, line {e.lineno})"
            ) from None
        per_lang = report.get("languages") if isinstance(report, dict) else None
        solo = (
            ((report.get("objective") or {}).get("reference") or None) if isinstance(report, dict) else None
        )
        source = str(path)
        if isinstance(per_lang, dict):
            found = {
                lang: (v.get("best") or {}).get("loss") for lang, v in per_lang.items() if isinstance(v, dict)
            }
        elif isinstance(solo, dict):  # a Tune best_weights.json: its solo runs' losses
            found = dict(solo)
        else:
            raise ValueError(
                f"data.online.reference: {path} is neither a training run's report.json (languages.<lang>."
                "best.loss) nor a Tune best_weights.json with objective.reference (tune.reference=solo)"
            )
    missing = sorted(lang for lang in languages if found.get(lang) is None)
    if missing:
        raise ValueError(
            f"{source}: no reference loss for {missing} (it has {sorted(k for k, v in found.items() if v is not None)}); "
            "every trained language needs one"
        )
    out = {}
    for lang in languages:
        v = found[lang]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{source}: the reference loss of {lang!r} must be a finite number, got {v!r}")
        out[lang] = float(v)
    return out
