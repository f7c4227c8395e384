"""Add a language to a trained model without forgetting the ones it already speaks.

The recipe, one :func:`add_language` call (``ray_jobs/add_language.py`` is its command line):

1. **baseline**: the run starts from the trained model (``train.init_from``) and evaluates every
   language it can validate at step 0, before any update: the old languages' losses there are the
   reference the forgetting guard and the report compare against;
2. **grow**: the AR and NAR language embeddings get a row per new language, and the phoneme embeddings
   grow when the new language brought symbols the model has never seen; old rows are untouched, so
   the old languages' outputs are bit-identical before training (``vallex.model.checkpoint``);
3. **train on a mix** of the new and old languages (``data.weights``, a replay ratio, or a Tune
   ``best_weights.json``) with the guard on — or, with ``mode="naive"``, on the new language alone,
   which is what fails;
4. **evaluate again**, and write ``<out>/forgetting_report.json`` (per language: baseline, final and
   relative change, the new language's curve, the guard's verdict) and ``<out>/forgetting.png``.

Everything runs through :func:`vallex.train.trainer.train`: Ray Data mixing, Ray Train + DeepSpeed.
Naive vs vallex from one base (the comparison), its demo and the command line are in
:mod:`vallex.train.add_language_compare`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vallex.config import WEIGHT_POLICIES, Config, derive_config
from vallex.files import save_figure, write_text
from vallex.train.guard import HIGHER_IS_BETTER
from vallex.train.plan import RunPlan, plan_run

log = logging.getLogger("vallex.add_language")

MODES = ("vallex", "naive")
REPORT_NAME = "forgetting_report.json"
FIGURE_NAME = "forgetting.png"
METRIC_NAMES = {
    "loss": "AR + NAR loss",
    "ar_loss": "AR loss",
    "nar_loss": "NAR loss",
    "text_gain": "text gain",
    "per": "synthesized PER",
}


class AddLanguageError(ValueError):
    """The add-language request cannot work as given; the message names the file, key or language."""


@dataclass
class AddLanguagePlan:
    """What an add-language run will do, decided before any Ray work starts."""

    mode: str
    base: str
    """The checkpoint the run starts from."""
    out_dir: str
    old_languages: list[str]
    """The base model's languages, in id order."""
    new_languages: list[str]
    trained_languages: list[str]
    """What the training stream mixes: the new languages (naive), or those plus the old ones with shards."""
    unwatched: list[str]
    """Old languages without prepared validation data: their forgetting cannot be measured."""
    weights: str | dict[str, float]
    """``data.weights`` of the training run."""
    replay_ratio: float | None
    new_phonemes: int
    """Symbols the prepared corpus adds to the base model's phoneme table."""
    config: Config = field(repr=False)
    """The training run's config (``train.init_from`` = base, ``data.languages`` = trained languages)."""
    base_kind: str = "vallex"
    """``vallex`` (a checkpoint), ``export`` (a run's model.pt) or ``public`` (VALL-E X, text bridged)."""
    run_plan: RunPlan | None = field(default=None, repr=False)
    """The training run's plan (languages, ids, weights, grown model), resolved with the rest."""

    def describe(self) -> str:
        w = (
            ", ".join(f"{lang}={v:.3f}" for lang, v in self.weights.items())
            if isinstance(self.weights, dict)
            else str(self.weights)
        )
        return (
            f"mode {self.mode}: model languages {self.old_languages} + new {self.new_languages}"
            f"{f' (+{self.new_phonemes} phoneme symbols)' if self.new_phonemes else ''}"
            f"{' (public VALL-E X base: text embeddings bridged)' if self.base_kind == 'public' else ''}; "
            f"training on {self.trained_languages} with weights {w}; "
            f"{self.config.train.max_steps} steps, guard max_rise {self.config.train.guard.max_rise:g} "
            f"({self.config.train.guard.action})"
        )


# ------------------------------------------------------------------------------------------ planning


def _short_hash(*parts) -> str:
    import hashlib

    return hashlib.sha1("\x1f".join(map(str, parts)).encode()).hexdigest()[:8]


def replay_weights(
    counts: dict[str, int], old: list[str], new: list[str], ratio: float, alpha: float
) -> dict[str, float]:
    """Explicit weights: the old languages share ``ratio`` of the stream, the new ones ``1 - ratio``;
    within each group by temperature sampling (p ~ n ** alpha), so a big old language is not all of it."""
    from vallex.data.weights import resolve_weights

    if not 0.0 < ratio < 1.0:
        raise AddLanguageError(
            f"replay ratio {ratio:g}: must be in (0, 1), the old languages' share of the training stream "
            "(0 trains the new language alone: that is --naive)"
        )
    out: dict[str, float] = {}
    for group, share in ((old, ratio), (new, 1.0 - ratio)):
        for lang, w in resolve_weights("temperature", {g: counts[g] for g in group}, alpha=alpha).items():
            out[lang] = share * w
    return out


def _base_languages(base: Path, symbols: list[str], vocab: str | None) -> tuple[list[str], int, str]:
    """The base checkpoint's languages (id order), how many symbols the corpus adds to its table, and
    its kind (``vallex``, ``export`` or ``public``).

    Reads only the checkpoint's metadata (tensors memory-mapped), and checks before any Ray work that
    the corpus's symbol table extends the model's (same ids for the same phonemes), or, for the public
    VALL-E X checkpoint, that its tokenizer file ``vocab`` is given and readable."""
    from vallex.model.checkpoint import CheckpointError, checkpoint_metadata

    if not base.is_file():
        raise AddLanguageError(
            f"base model {base} does not exist (expected a vallex checkpoint, e.g. a run's train/model.pt, "
            "or the public VALL-E X vallex-checkpoint.pt with --base-vocab)"
        )
    try:
        meta = checkpoint_metadata(base, symbols=symbols, vocab=vocab)
    except CheckpointError as e:
        raise AddLanguageError(f"base model {base}: {e}") from None
    return list(meta["languages"]), len(symbols) - len(meta["symbols"]["list"]), meta["kind"]


def plan_add_language(
    cfg: Config,
    *,
    base: str | os.PathLike,
    new_languages: list[str],
    out_dir: str | os.PathLike,
    mode: str = "vallex",
    replay_ratio: float | None = None,
    run_name: str | None = None,
    base_vocab: str | os.PathLike | None = None,
) -> AddLanguagePlan:
    """Check the request against the base model and the prepared corpus; build the training config.

    ``cfg`` supplies everything else (prepared corpus ``run.prepared_dir`` or ``<run.output_dir>/prepare``,
    training, guard, ``data.weights`` when no ``replay_ratio`` is given). The run writes under ``out_dir``.
    """
    from vallex.data.corpus import PreparedCorpus

    if mode not in MODES:
        raise AddLanguageError(f"mode {mode!r}: must be one of {MODES}")
    new = sorted(dict.fromkeys(new_languages))
    if not new:
        raise AddLanguageError("no new language given (e.g. --new ar)")
    base = Path(base)
    corpus = PreparedCorpus.open(cfg.prepared_dir)
    base_vocab = str(Path(base_vocab).resolve()) if base_vocab else None
    old, new_phonemes, base_kind = _base_languages(base, corpus.symbols, base_vocab)
    manifest = f"{cfg.prepared_dir}/manifest.json"
    missing = [lang for lang in new if lang not in corpus.languages]
    if missing:
        raise AddLanguageError(
            f"new language(s) {missing} have no prepared shards in {manifest} (prepared: {corpus.languages}); "
            "prepare them into the same folder first (ray_jobs/prepare.py corpus.languages=[...]): it appends "
            "their phonemes to the shared symbol table"
        )
    known = [lang for lang in new if lang in old]
    if known:
        raise AddLanguageError(
            f"{known} already belong to the base model {base} (its languages: {old}); to keep training them "
            "use ray_jobs/train.py with train.init_from"
        )
    with_data = [lang for lang in old if lang in corpus.languages]
    unwatched = [lang for lang in old if lang not in corpus.languages]
    if mode == "vallex" and not with_data:
        raise AddLanguageError(
            f"none of the base model's languages {old} has shards in {manifest}: mixing needs at least a "
            "replay subset of them (prepare a few hundred utterances per old language), or run --naive"
        )
    counts = corpus.counts("train")
    if mode == "naive":
        trained = new
        # Only the new languages are in the stream: a policy still applies, a map or file of old ones can't.
        policy = isinstance(cfg.data.weights, str) and cfg.data.weights in WEIGHT_POLICIES
        weights: str | dict[str, float] = cfg.data.weights if policy else "uniform"
        if replay_ratio is not None:
            raise AddLanguageError("--replay-ratio mixes old languages in: it cannot go with --naive")
    else:
        trained = sorted(with_data + new)
        if replay_ratio is not None:
            weights = replay_weights(counts, with_data, new, replay_ratio, cfg.data.alpha)
        else:
            weights = cfg.data.weights
    try:
        run_cfg = derive_config(
            cfg,
            {
                "run.output_dir": str(out_dir),
                # The output folder and the base model are in the name: runs sharing a train.storage_path
                # must never resume each other's checkpoints.
                "run.name": run_name
                or f"add-{'-'.join(new)}-{mode}-{_short_hash(Path(out_dir).resolve(), base.resolve())}",
                "run.prepared_dir": cfg.prepared_dir,
                "corpus.languages": [],  # the corpus is already prepared; every prepared language may be used
                "data.languages": trained,
                "data.weights": weights,
                "train.init_from": str(base.resolve()),
                "train.init_vocab": base_vocab or "",
            },
        )
    except ValueError as e:
        raise AddLanguageError(f"config: {e}") from None
    # The run's plan, resolved now (weights from a policy, a map or a Tune best_weights.json; the base
    # model grown to the new languages): a file or map that leaves a new language out would give it
    # weight 0, and the run would train only the old ones.
    try:
        run_plan = plan_run(run_cfg)
    except (ValueError, OSError) as e:
        raise AddLanguageError(str(e)) from None
    absent = [lang for lang in new if run_plan.weights.get(lang, 0.0) <= 0]
    if absent:
        raise AddLanguageError(
            f"data.weights ({weights}) gives the new language(s) {absent} no weight: they would not be "
            "trained; give them a weight, use --replay-ratio, or a weights policy"
        )
    return AddLanguagePlan(
        mode=mode,
        base=str(base),
        out_dir=str(out_dir),
        old_languages=old,
        new_languages=new,
        trained_languages=trained,
        unwatched=unwatched,
        weights=weights,
        replay_ratio=replay_ratio,
        new_phonemes=new_phonemes,
        config=run_cfg,
        base_kind=base_kind,
        run_plan=run_plan,
    )


# ------------------------------------------------------------------------------------------- report


def forgetting_report(records: list[dict], train_report: dict, plan: AddLanguagePlan) -> dict:
    """``forgetting_report.json``: every language's loss at step 0 (baseline) and at the end, its relative
    change and verdict, the new languages' curves, and the guard's verdict.

    An old language is *kept* when its final loss is at most ``max_rise`` (the guard's threshold for it)
    above its baseline, else *forgotten*; a new language is *learned* when its loss fell."""
    if not records or records[0]["step"] != 0:
        raise AddLanguageError(
            f"{plan.config.train_dir / 'metrics.jsonl'}: no step-0 evaluation (the baseline); "
            "was the run started with train.init_from?"
        )
    g = plan.config.train.guard
    metric = g.metric
    first, last = records[0], records[-1]
    guard = train_report.get("guard") or {}
    trips: dict[str, list[int]] = {}
    for t in guard.get("trips", []):
        for lang in t["languages"]:
            trips.setdefault(lang, []).append(t["step"])
    languages: dict[str, dict[str, Any]] = {}
    curves: dict[str, list[dict]] = {}
    for lang in sorted(last["valid"]):
        if lang not in first["valid"]:
            continue
        curves[lang] = [
            {
                "step": r["step"],
                "loss": r["valid"][lang][metric],
                "ar_loss": r["valid"][lang]["ar_loss"],
                "nar_loss": r["valid"][lang]["nar_loss"],
            }
            for r in records
            if lang in r["valid"]
        ]
        baseline, final = first["valid"][lang][metric], last["valid"][lang][metric]
        if baseline is None or final is None:
            continue
        change = (final - baseline) / baseline if baseline > 0 else math.nan
        limit = g.per_language.get(lang, g.max_rise)
        role = "new" if lang in plan.new_languages else "old"
        higher_is_better = metric in HIGHER_IS_BETTER  # text gain: forgetting is a fall
        worse = -change if higher_is_better else change
        if role == "old":
            verdict = "forgotten" if worse > limit else "kept"  # a 0 baseline (nan) has nothing to lose
        else:
            verdict = (
                "learned" if (final > baseline if higher_is_better else final < baseline) else "not learned"
            )
        best = (max if higher_is_better else min)(curves[lang], key=lambda p: p["loss"])
        languages[lang] = {
            "role": role,
            "trained": lang in plan.trained_languages,
            "baseline": baseline,
            "final": final,
            "relative_change": change,
            "best": best["loss"],
            "best_step": best["step"],
            "max_rise": limit,
            "verdict": verdict,
            "guard_trips": trips.get(lang, []),
        }
        # Whether the language is still *said*, not only how its codes sound (vallex.eval.intelligibility).
        for key in ("text_gain", "per"):
            a, b = first["valid"][lang].get(key), last["valid"][lang].get(key)
            if a is not None or b is not None:
                languages[lang][key] = {"baseline": a, "final": b}
                if key == "per":
                    languages[lang][key]["floor"] = last["valid"][lang].get("per_floor")
    forgotten = sorted(lang for lang, v in languages.items() if v["verdict"] == "forgotten")
    return {
        "mode": plan.mode,
        "base": plan.base,
        "old_languages": plan.old_languages,
        "new_languages": plan.new_languages,
        "trained_languages": plan.trained_languages,
        "unwatched_languages": plan.unwatched,
        "new_phoneme_symbols": plan.new_phonemes,
        "weights": train_report.get("weights"),
        "replay_ratio": plan.replay_ratio,
        "realized_fractions": last.get("realized_fractions", {}),
        "metric": metric,
        "baseline_step": first["step"],
        "final_step": last["step"],
        "languages": languages,
        "new_language_curve": {lang: curves[lang] for lang in plan.new_languages if lang in curves},
        "curves": curves,
        "forgotten": forgotten,
        "verdict": "forgetting" if forgotten else "ok",
        "guard": guard,
        "model_file": train_report.get("model_file"),
        "wall_seconds": train_report.get("wall_seconds"),
    }


def report_table(report: dict) -> str:
    """The report as a terminal table, one language a row; text gain and PER (step 0 -> final) when
    the runs measured them."""
    gain = any("text_gain" in v for v in report["languages"].values())
    per = any("per" in v for v in report["languages"].values())
    head = f"{'language':<10}{'role':<6}{'baseline':>10}{'final':>10}{'change':>9}"
    head += f"{'text gain':>16}" if gain else ""
    head += f"{'PER':>14}" if per else ""
    rows = [head + "  verdict"]
    for lang, v in report["languages"].items():
        row = (
            f"{lang:<10}{v['role']:<6}{v['baseline']:>10.3f}{v['final']:>10.3f}"
            f"{v['relative_change'] * 100:>+8.1f}%"
        )
        if gain:
            row += f" {_arrow(v.get('text_gain'), '{:.3f}'):>15}"
        if per:
            row += f" {_arrow(v.get('per'), '{:.0%}'):>13}"
        rows.append(
            row
            + f"  {v['verdict']}"
            + (f" (guard tripped at steps {v['guard_trips']})" if v["guard_trips"] else "")
        )
    return "\n".join(rows)


def _arrow(pair: dict | None, fmt: str) -> str:
    """``baseline -> final`` of a {baseline, final} pair ("-" for a missing value)."""
    if not pair:
        return "-"
    a, b = (("-" if x is None else fmt.format(x)) for x in (pair.get("baseline"), pair.get("final")))
    return f"{a} -> {b}"


def _title(report: dict) -> str:
    new = ", ".join(report["new_languages"])
    if report["mode"] == "naive":
        return f"naive: {new} alone"
    fr = report.get("realized_fractions") or {}
    old_share = sum(f for lang, f in fr.items() if lang not in report["new_languages"])
    return f"vallex: {new} + {old_share * 100:.0f}% replay of the old languages"


def plot_forgetting(reports: list[dict], path: str | os.PathLike) -> None:
    """PNG, one panel per report: each language's validation loss relative to its step-0 baseline.
    Old languages solid, new ones dashed, the guard's limit as a red line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports), figsize=(5.2 * len(reports), 4), sharey=True, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    langs = sorted({lang for r in reports for lang in r["curves"]})
    for ax, rep in zip(axes[0], reports, strict=True):
        for i, lang in enumerate(langs):
            curve = rep["curves"].get(lang)
            if not curve or lang not in rep["languages"]:
                continue
            base = rep["languages"][lang]["baseline"]
            new = rep["languages"][lang]["role"] == "new"
            ax.plot(
                [p["step"] for p in curve],
                [(p["loss"] / base - 1) * 100 for p in curve],
                linestyle="--" if new else "-",
                marker=".",
                color=colors[i % len(colors)],
                label=f"{lang} (new)" if new else lang,
            )
        limit = rep["guard"].get("max_rise", 0.2) * 100 if rep.get("guard") else 20.0
        ax.axhline(limit, color="red", linewidth=1, linestyle=":", label=f"guard limit +{limit:.0f}%")
        ax.axhline(0, color="gray", linewidth=0.8)
        ax.set_title(_title(rep), fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel(f"validation {METRIC_NAMES[reports[0]['metric']]} vs. step 0 (%)")
    fig.tight_layout()
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------- run


def add_language(plan: AddLanguagePlan) -> dict:
    """Train as planned (Ray Train + DeepSpeed), then write the forgetting report and its figure."""
    from vallex.train.metrics import read_metrics
    from vallex.train.trainer import train

    cfg = plan.config
    log.info("add language: %s", plan.describe())
    if plan.unwatched:
        log.warning(
            "WARNING: %s have no prepared validation data: their forgetting is not measured", plan.unwatched
        )
    if plan.mode == "naive":
        log.warning(
            "naive mode: training on %s alone; the old languages are only evaluated (this is the "
            "recipe that forgets)",
            plan.new_languages,
        )
    train_report = train(cfg, plan=plan.run_plan)
    records = read_metrics(cfg.train_dir / "metrics.jsonl")
    report = forgetting_report(records, train_report, plan)
    out = Path(plan.out_dir)
    write_text(out / REPORT_NAME, json.dumps(report, indent=2))
    plot_forgetting([report], out / FIGURE_NAME)
    log.info(
        "%s mode: validation %s at step 0 (baseline) and step %d:\n%s",
        plan.mode,
        report["metric"],
        report["final_step"],
        report_table(report),
    )
    log.info(
        "verdict: %s; guard: %s; wrote %s and %s",
        "old languages kept" if report["verdict"] == "ok" else f"forgot {report['forgotten']}",
        report["guard"].get("verdict", "-"),
        out / REPORT_NAME,
        out / FIGURE_NAME,
    )
    return report
