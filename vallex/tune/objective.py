"""What a language-weight search minimizes: one number from the per-language validation losses.

The workers of every trial call :func:`score` at each evaluation on the all-reduced losses, so the
value Tune sees (rank 0's report) is the same on every rank. Kinds (``tune.objective``):

``normalized_max`` (default)
    The worst language's *normalized* loss: ``loss - reference`` (``normalize="excess"``, as DoReMi's
    excess loss) or ``loss / reference`` (``normalize="ratio"``), with ``reference`` a per-language
    loss that says what this language can reach (e.g. its loss in a short run with the whole budget on
    it alone). Languages differ in how hard they are: raw losses put the hardest language on top
    whatever the weights, and a search on the raw maximum would pour every sample into it even once it
    has stopped improving. Normalizing first compares how far each language is from what it can
    reach, so the minimax point balances the languages' *remaining* progress.
``max``
    The worst language's raw loss. Right when the languages are about equally hard.
``mean``
    The mean raw loss: the overall quality, blind to any one language falling behind.
``spread``
    ``max - min`` of the raw losses. Not a good objective on its own: it is minimized just as well by
    every language being equally *bad* (an untrained model has about the same loss, log(1024) per
    codebook, on every language, so a spread near 0), and a search can game it by starving the
    languages that learn fastest. Use it to look at, or with a tie-break, not as the only target.

Every kind also returns ``objective_tiebreak``, the mean raw loss: among weightings whose objective
is within ``tune.tie_tolerance`` of the best, the lowest mean wins (:func:`pick_best`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

KINDS = ("normalized_max", "max", "mean", "spread")
NORMALIZE = ("excess", "ratio")
METRICS = ("loss", "ar_loss", "nar_loss")


def _losses(valid: Mapping[str, Mapping], metric: str) -> dict[str, float]:
    if metric not in METRICS:
        raise ValueError(f"tune.metric must be one of {METRICS}, got {metric!r}")
    if not valid:
        raise ValueError("no per-language validation losses to score")
    out = {}
    for lang, v in valid.items():
        x = v.get(metric)
        if x is None:
            raise ValueError(
                f"tune.metric={metric}: language {lang!r} has no {metric} (a stage not trained, see "
                "train.train_stage); choose a metric the run computes"
            )
        out[lang] = float(x)
    return out


def normalized(
    losses: Mapping[str, float], reference: Mapping[str, float] | None, normalize: str = "excess"
) -> dict[str, float]:
    """Each language's loss relative to its reference: ``loss - ref`` or ``loss / ref``."""
    if normalize not in NORMALIZE:
        raise ValueError(f"tune.normalize must be one of {NORMALIZE}, got {normalize!r}")
    if not reference:
        raise ValueError(
            "tune.objective=normalized_max needs per-language reference losses (tune.reference); "
            "none were given"
        )
    missing = sorted(set(losses) - set(reference))
    if missing:
        raise ValueError(
            f"tune.reference has no loss for {missing} (it has {sorted(reference)}); "
            "every evaluated language needs one"
        )
    if normalize == "excess":
        return {lang: x - float(reference[lang]) for lang, x in losses.items()}
    bad = sorted(lang for lang in losses if not float(reference[lang]) > 0)
    if bad:
        raise ValueError(f"tune.normalize=ratio needs reference losses > 0; {bad} have {reference}")
    return {lang: x / float(reference[lang]) for lang, x in losses.items()}


def score(
    valid: Mapping[str, Mapping],
    kind: str = "normalized_max",
    reference: Mapping[str, float] | None = None,
    metric: str = "loss",
    normalize: str = "excess",
) -> dict[str, float]:
    """The search objective (lower is better) from ``{lang: {"loss": .., "ar_loss": .., ...}}``.

    Returns ``objective``, ``objective_tiebreak`` (mean raw loss) and, for ``normalized_max``,
    ``norm/<lang>`` for every language.
    """
    losses = _losses(valid, metric)
    if not all(math.isfinite(x) for x in losses.values()):  # diverged: the worst score, not a crash
        return {"objective": math.inf, "objective_tiebreak": math.inf}
    mean = math.fsum(losses.values()) / len(losses)
    out = {"objective_tiebreak": mean}
    if kind == "normalized_max":
        norm = normalized(losses, reference, normalize)
        out["objective"] = max(norm.values())
        out.update({f"norm/{lang}": v for lang, v in sorted(norm.items())})
    elif kind == "max":
        out["objective"] = max(losses.values())
    elif kind == "mean":
        out["objective"] = mean
    elif kind == "spread":
        out["objective"] = max(losses.values()) - min(losses.values())
    else:
        raise ValueError(f"tune.objective must be one of {KINDS}, got {kind!r}")
    return out


def pick_best(rows: Sequence[Mapping], tolerance: float = 0.01) -> Mapping | None:
    """The best row by ``objective``, ties broken by ``objective_tiebreak``.

    Rows whose objective is within ``tolerance`` of the best one (relative to its magnitude, with an
    absolute floor of ``tolerance`` x 1e-3 for objectives near 0) count as tied; the lowest tie-break
    among them wins. Rows without a finite objective are skipped; None when none is left.
    """
    ok = [r for r in rows if r.get("objective") is not None and math.isfinite(r["objective"])]
    if not ok:
        return None
    best = min(r["objective"] for r in ok)
    slack = tolerance * max(abs(best), 1e-3)
    tied = [r for r in ok if r["objective"] <= best + slack]
    return min(tied, key=lambda r: (r.get("objective_tiebreak", math.inf), r["objective"]))
