"""Language sampling weights: a policy name, an explicit map or a Tune result -> normalized weights.

Policies, for ``n`` train rows per language:

- ``uniform``: every language equally often, however small.
- ``proportional``: p ~ n (natural distribution; small languages are rarely seen and get forgotten).
- ``temperature``: p ~ n ** alpha (alpha=0 uniform, alpha=1 proportional; 0.3-0.7 is common).
- ``unimax``: Chung et al. 2023, "UniMax: Fairer and More Effective Language Sampling for
  Large-Scale Multilingual Pretraining", Algorithm 1. A training budget of ``budget`` rows is split
  evenly across languages, but no language is repeated more than ``unimax_epochs`` times; what a
  capped language cannot use is split evenly among the rest. Small languages stay as uniform as the
  repetition cap allows, without being memorized.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

from vallex.config import WEIGHT_POLICIES  # the names the config accepts; one list for both


def normalize(raw: Mapping[str, float], source: str) -> dict[str, float]:
    """``raw`` scaled to sum 1: the one place sampling weights are normalized (``source`` names them in
    the error). Weights that already sum to 1 are returned as they are, so normalizing twice changes
    nothing."""
    total = math.fsum(raw.values())
    if total == 1.0:
        return dict(raw)
    if total <= 0:
        raise ValueError(f"{source}: all weights are 0 ({raw}); at least one language needs a weight > 0")
    return {lang: w / total for lang, w in raw.items()}


def _check_counts(counts: Mapping[str, int]) -> None:
    if not counts:
        raise ValueError("no languages to weight: the corpus (or data.languages) selects none")
    for lang, n in counts.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"counts[{lang!r}] = {n!r}: row counts must be integers >= 0")


def _require_rows(counts: Mapping[str, int], policy: str) -> None:
    empty = sorted(lang for lang, n in counts.items() if n == 0)
    if empty:
        raise ValueError(
            f"weights policy {policy!r} cannot weight languages with 0 train rows: {empty}; "
            "drop them from data.languages or prepare data for them"
        )


def unimax(counts: Mapping[str, int], budget: int, max_epochs: float) -> dict[str, float]:
    """Rows allotted per language (UniMax Algorithm 1), before normalization."""
    if budget is None or budget <= 0:
        raise ValueError(
            f"weights policy 'unimax' needs budget > 0 (total training rows, e.g. steps x global batch "
            f"size), got {budget!r}"
        )
    if not max_epochs > 0:
        raise ValueError(f"unimax_epochs must be > 0, got {max_epochs!r}")
    allotted: dict[str, float] = {}
    remaining = float(budget)
    # Smallest first: a language that hits its cap hands its unused share to the larger ones after it.
    ordered = sorted(counts, key=lambda lang: (counts[lang], lang))
    for i, lang in enumerate(ordered):
        even_share = remaining / (len(ordered) - i)
        allotted[lang] = min(even_share, counts[lang] * max_epochs)
        remaining -= allotted[lang]
    return {lang: allotted[lang] for lang in counts}


def _policy(name: str, counts: Mapping[str, int], alpha: float, unimax_epochs: float, budget) -> dict:
    if name == "uniform":
        _require_rows(counts, name)
        return {lang: 1.0 for lang in counts}
    if name == "proportional":
        _require_rows(counts, name)
        return {lang: float(n) for lang, n in counts.items()}
    if name == "temperature":
        _require_rows(counts, name)
        if not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"temperature alpha must be a finite number >= 0, got {alpha!r}")
        return {lang: float(n) ** alpha for lang, n in counts.items()}
    if name == "unimax":
        return unimax(counts, budget, unimax_epochs)
    raise AssertionError(name)


def _explicit(raw: Mapping, counts: Mapping[str, int], source: str) -> dict[str, float]:
    """Check an explicit ``{lang: weight}`` map; languages it leaves out get 0."""
    if not isinstance(raw, Mapping) or not raw:
        raise ValueError(f"{source}: weights must be a non-empty {{language: weight}} map, got {raw!r}")
    out = {lang: 0.0 for lang in counts}
    for lang, w in raw.items():
        if lang not in counts:
            raise ValueError(
                f"{source}: weight for {lang!r}, a language without shards here; available: {sorted(counts)}"
            )
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise ValueError(f"{source}: weight for {lang!r} must be a number, got {w!r}")
        if not math.isfinite(w):
            raise ValueError(f"{source}: weight for {lang!r} is {w}; weights must be finite numbers >= 0")
        if w < 0:
            raise ValueError(f"{source}: weight for {lang!r} is {w}; weights must be >= 0")
        if w > 0 and counts[lang] == 0:
            raise ValueError(
                f"{source}: {lang!r} has weight {w} but 0 train rows; give it weight 0 or prepare data"
            )
        out[lang] = float(w)
    return out


def _from_file(path: Path, counts: Mapping[str, int]) -> dict[str, float]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, dict) or "weights" not in data:
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f'{path}: needs a top-level "weights" key (a Tune best_weights.json), found {found}')
    return _explicit(data["weights"], counts, f"{path}: weights")


def resolve_weights(
    spec: str | os.PathLike | Mapping[str, float],
    counts: Mapping[str, int],
    *,
    alpha: float = 0.5,
    unimax_epochs: float = 4.0,
    budget: int | None = None,
) -> dict[str, float]:
    """Normalized sampling weights (sum 1) for every language in ``counts`` (train rows per language).

    ``spec`` is a policy name (see the module docstring), a ``{lang: weight}`` map (any positive
    scale; languages left out get 0), or the path of a JSON file with a ``"weights"`` map.
    """
    _check_counts(counts)
    if isinstance(spec, Mapping):
        raw = _explicit(spec, counts, "weights")
        source = "weights"
    elif isinstance(spec, (str, os.PathLike)):
        name = os.fspath(spec)
        if name in WEIGHT_POLICIES:
            raw = _policy(name, counts, alpha, unimax_epochs, budget)
            source = f"weights policy {name!r}"
        elif name.endswith(".json") or os.sep in name or Path(name).is_file():
            path = Path(name)
            if not path.is_file():
                raise ValueError(f"weights file {name!r} does not exist (expected a Tune best_weights.json)")
            raw = _from_file(path, counts)
            source = str(path)
        else:
            close = difflib.get_close_matches(name, WEIGHT_POLICIES, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(
                f"unknown weights policy {name!r}; {hint}use one of {list(WEIGHT_POLICIES)}, "
                "a {language: weight} map or the path of a best_weights.json"
            )
    else:
        raise ValueError(f"weights must be a policy name, a map or a JSON path, got {type(spec).__name__}")
    return normalize(raw, source)
