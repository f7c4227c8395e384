"""Search spaces over the language sampling weights: a trial's parameters <-> a weight vector.

``stick`` (default)
    Stick-breaking with ``L - 1`` parameters in [0, 1]: language i takes a fraction of what the
    languages before it left, through the inverse CDF of Beta(1, L - 1 - i), so that uniform draws of
    the parameters are uniform draws on the simplex (Dirichlet(1, ..., 1)). Every weight vector has
    exactly one parameter point, which suits a model-based search such as TPE.
``logits``
    Softmax of one logit per language in [-4, 4], the first language's fixed at 0 (softmax is
    unchanged by a shift, so a free first logit would only add a flat direction to search).
``temperature``
    One parameter ``alpha`` in [0, 1]: p ~ n ** alpha over train rows n (0 = uniform, 1 = proportional).
    A 1-D search: cheap, but it can only trade small languages against large ones, not hard against easy.

``min_weight`` keeps every language in the mix: ``w = min_weight + (1 - L * min_weight) * p``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

SPACES = ("stick", "logits", "temperature")
LOGIT_RANGE = 4.0


def check_min_weight(languages: list[str], min_weight: float) -> None:
    """``tune.min_weight`` must leave something to search for this many languages."""
    if not languages:
        raise ValueError("no languages to weight")
    if not (min_weight >= 0.0 and min_weight * len(languages) < 1.0):
        raise ValueError(
            f"tune.min_weight={min_weight} x {len(languages)} languages must be < 1 "
            f"(at most {1 / len(languages):.3f} each leaves nothing to search)"
        )


def param_names(space: str, languages: list[str]) -> list[str]:
    langs = sorted(languages)
    if space == "stick":
        return [f"stick_{lang}" for lang in langs[:-1]]
    if space == "logits":
        return [f"logit_{lang}" for lang in langs[1:]]
    if space == "temperature":
        return ["alpha"]
    raise ValueError(f"tune.space must be one of {SPACES}, got {space!r}")


def tune_space(space: str, languages: list[str]) -> dict:
    """The Ray Tune search space (``param_space`` entries) for these languages."""
    from ray import tune

    names = param_names(space, languages)
    if space == "logits":
        return {n: tune.uniform(-LOGIT_RANGE, LOGIT_RANGE) for n in names}
    return {n: tune.uniform(0.0, 1.0) for n in names}


def _floor(p: Mapping[str, float], min_weight: float) -> dict[str, float]:
    scale = 1.0 - len(p) * min_weight
    return {lang: min_weight + scale * v for lang, v in p.items()}


def to_weights(
    space: str,
    params: Mapping[str, float],
    languages: list[str],
    min_weight: float = 0.0,
    counts: Mapping[str, int] | None = None,
) -> dict[str, float]:
    """The sampling weights (sum 1, sorted by language) of one point of the space."""
    check_min_weight(languages, min_weight)
    langs = sorted(languages)
    missing = [n for n in param_names(space, langs) if n not in params]
    if missing:
        raise ValueError(f"tune.space={space}: the trial config lacks {missing}")
    if space == "stick":
        p, rest = {}, 1.0
        for i, lang in enumerate(langs[:-1]):
            u = min(max(float(params[f"stick_{lang}"]), 0.0), 1.0)
            k = len(langs) - i - 1  # languages after this one
            v = 1.0 - (1.0 - u) ** (1.0 / k)  # inverse CDF of Beta(1, k)
            p[lang] = rest * v
            rest -= p[lang]
        p[langs[-1]] = max(rest, 0.0)
    elif space == "logits":
        z = {lang: 0.0 if i == 0 else float(params[f"logit_{lang}"]) for i, lang in enumerate(langs)}
        top = max(z.values())
        e = {lang: math.exp(v - top) for lang, v in z.items()}
        total = math.fsum(e.values())
        p = {lang: v / total for lang, v in e.items()}
    else:  # temperature
        if counts is None:
            raise ValueError("tune.space=temperature needs the languages' train row counts")
        alpha = float(params["alpha"])
        raw = {lang: float(counts[lang]) ** alpha for lang in langs}
        total = math.fsum(raw.values())
        p = {lang: v / total for lang, v in raw.items()}
    return _floor(p, min_weight)


def to_params(
    space: str,
    weights: Mapping[str, float],
    languages: list[str],
    min_weight: float = 0.0,
) -> dict[str, float] | None:
    """The point of the space with these weights (the inverse of :func:`to_weights`), or None when
    the space cannot express them (a weight under ``min_weight``, or any vector in ``temperature``).
    Used to tell the searcher how the baselines scored."""
    check_min_weight(languages, min_weight)
    langs = sorted(languages)
    total = math.fsum(weights.get(lang, 0.0) for lang in langs)
    scale = 1.0 - len(langs) * min_weight
    p = {lang: (weights.get(lang, 0.0) / total - min_weight) / scale for lang in langs}
    if any(v < -1e-9 for v in p.values()):
        return None
    p = {lang: max(v, 0.0) for lang, v in p.items()}
    if space == "stick":
        out, rest = {}, 1.0
        for i, lang in enumerate(langs[:-1]):
            k = len(langs) - i - 1
            v = min(p[lang] / rest, 1.0) if rest > 1e-12 else 0.0
            out[f"stick_{lang}"] = 1.0 - (1.0 - v) ** k
            rest -= p[lang]
        return out
    if space == "logits":
        if any(v <= 0 for v in p.values()):
            return None
        z = {lang: math.log(p[lang]) - math.log(p[langs[0]]) for lang in langs[1:]}
        if any(abs(v) > LOGIT_RANGE for v in z.values()):
            return None
        return {f"logit_{lang}": v for lang, v in z.items()}
    if space == "temperature":
        return None
    raise ValueError(f"tune.space must be one of {SPACES}, got {space!r}")


def perturb(
    space: str,
    params: Mapping[str, float],
    languages: list[str],
    rng,
    *,
    sigma: float,
    resample: float,
    min_weight: float = 0.0,
    counts: Mapping[str, int] | None = None,
) -> tuple[dict[str, float], str]:
    """PBT's *explore* step on the simplex: a nearby point of the space, and how it was made.

    With probability ``resample`` a fresh uniform draw of the whole space; else each language's share
    above ``min_weight`` is multiplied by ``exp(N(0, sigma))`` and the shares renormalized (for
    ``logits`` that is Gaussian noise on the logits, clipped to the range; for ``temperature``, noise of
    ``sigma`` on alpha, clipped to [0, 1]). Every result maps back through :func:`to_weights` to
    weights that sum to 1 with every language at ``min_weight`` or more. ``rng`` is a
    ``random.Random`` (or anything with ``random`` and ``gauss``)."""
    langs = sorted(languages)
    names = param_names(space, langs)
    if rng.random() < resample:
        lo, hi = (-LOGIT_RANGE, LOGIT_RANGE) if space == "logits" else (0.0, 1.0)
        return {n: lo + (hi - lo) * rng.random() for n in names}, "resampled"
    if space == "temperature":
        alpha = min(max(float(params["alpha"]) + rng.gauss(0.0, sigma), 0.0), 1.0)
        return {"alpha": alpha}, f"alpha {float(params['alpha']):.3f} -> {alpha:.3f}"
    w = to_weights(space, params, langs, min_weight, counts=counts)
    scale = 1.0 - len(langs) * min_weight
    # The share above the floor; a language at the floor exactly gets a tiny share so it can grow again.
    p = {lang: max((w[lang] - min_weight) / scale, 1e-6) for lang in langs}
    z = {lang: math.log(v) + rng.gauss(0.0, sigma) for lang, v in p.items()}
    if space == "logits":
        out = {
            f"logit_{lang}": min(max(z[lang] - z[langs[0]], -LOGIT_RANGE), LOGIT_RANGE) for lang in langs[1:]
        }
    else:  # stick: renormalize, then the (exact) inverse map
        top = max(z.values())
        e = {lang: math.exp(v - top) for lang, v in z.items()}
        total = math.fsum(e.values())
        new = {lang: min_weight + scale * v / total for lang, v in e.items()}
        out = to_params(space, new, langs, min_weight)
    return out, f"log-weights + N(0, {sigma:g})"
