"""Naive vs vallex from one base model: the add-language comparison, its demo, and the command line.

- :func:`train_base`: a base model on the old languages (the demo's step 3; the tests' base model);
- :func:`compare_add_language`: add the new language(s) to that base twice, naively (the new language
  alone: the recipe that forgets) and with vallex (a mix with the old ones, the guard on), each through
  :func:`vallex.train.add_language.add_language`; then :func:`write_comparison` writes
  ``comparison.md`` (loss, text gain and synthesized PER per language, step 0 vs each mode's end),
  ``comparison.json`` (both forgetting reports) and ``add_language.png``;
- :func:`add_language_demo`: the README's headline on the embedded demo corpus: corpus, preparation
  (old languages alone, then the new one appended to a copy), the phoneme recognizer that scores
  synthesized speech, the base model, then the comparison;
- :func:`run_command`: what ``ray_jobs/add_language.py`` runs for an :class:`AddLanguageCommand`
  (one mode, ``--compare`` or ``--demo``), returning its exit status.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from vallex.config import Config, derive_config
from vallex.files import write_text
from vallex.train.add_language import (
    METRIC_NAMES,
    AddLanguageError,
    add_language,
    plan_add_language,
    plot_forgetting,
)

log = logging.getLogger("vallex.add_language")

DEMO_OUT = "runs/add_language"
DEMO_FIGURE = "docs/add_language.png"
DEMO_BASE_STEPS = 900
"""The demo's base model reads its text only after ~300 steps (job.yaml's model: text gain 0.01-0.03 at
300 steps, 0.08-0.29 at 900; docs/BENCHMARKS.md): a base that does not read cannot show naive training
taking its reading away."""
DEMO_ADD_STEPS = 300
COMPARISON_FIGURE = "add_language.png"


# ---------------------------------------------------------------------------------------- the runs


def _fresh(path: Path) -> None:
    """The demo's runs start over each time (their Ray results too), so its numbers are reproducible."""
    shutil.rmtree(path, ignore_errors=True)


def train_base(
    cfg: Config, *, out: str | os.PathLike, prepared_dir: str | os.PathLike, languages, steps: int
):
    """Train a base model from scratch on ``languages`` of ``prepared_dir`` for ``steps`` steps under
    ``out`` (started over: an earlier run there is removed). Returns the run's report; its
    ``model_file`` is the base of the add-language runs."""
    from vallex.train.trainer import train

    out = Path(out)
    _fresh(out)
    base_cfg = derive_config(
        cfg,
        {
            "run.output_dir": str(out),
            "run.name": "base",
            "run.prepared_dir": str(prepared_dir),
            "corpus.languages": [],
            "data.languages": list(languages),
            "train.max_steps": steps,
            "train.init_from": "",
            "train.storage_path": "",
        },
    )
    report = train(base_cfg)
    if not report.get("model_file"):
        raise AddLanguageError(f"the base run wrote no model file (see {base_cfg.train_dir / 'report.json'})")
    return report


def plan_comparison(
    cfg: Config,
    *,
    base: str | os.PathLike,
    new_languages: list[str],
    out: str | os.PathLike,
    replay_ratio: float | None = None,
    base_vocab: str | os.PathLike | None = None,
) -> dict:
    """Both runs of the comparison, checked before either trains (no Ray needed): adding
    ``new_languages`` to ``base`` naively (``<out>/naive``) and with vallex (``<out>/vallex``;
    ``replay_ratio``, else ``cfg``'s ``data.weights``). ``{mode: AddLanguagePlan}``."""
    return {
        mode: plan_add_language(
            cfg,
            base=base,
            new_languages=new_languages,
            out_dir=Path(out) / mode,
            mode=mode,
            replay_ratio=None if mode == "naive" else replay_ratio,
            base_vocab=base_vocab,
        )
        for mode in ("naive", "vallex")
    }


def compare_add_language(
    plans: dict,
    out: str | os.PathLike,
    *,
    figure: str | os.PathLike | None = None,
    fresh: bool = False,
    started: float | None = None,
) -> tuple[dict, bool]:
    """Run both planned modes (:func:`plan_comparison`), naive first, then write the comparison under
    ``out`` (and the figure to ``figure``). ``fresh`` starts each run over instead of resuming it.
    Returns ``(reports, shown)``: each mode's forgetting report, and whether the expected contrast
    showed (vallex kept the old languages, naive forgot them)."""
    started = time.time() if started is None else started
    reports = {}
    for i, (mode, plan) in enumerate(plans.items()):
        if fresh:
            _fresh(Path(plan.out_dir))
        log.info(
            "== add %s, %s mode (%d/%d), from the same base %s",
            plan.new_languages,
            mode,
            i + 1,
            len(plans),
            plan.base,
        )
        reports[mode] = add_language(plan)
    shown = write_comparison(reports, out, figure=figure, minutes=(time.time() - started) / 60)
    return reports, shown


# -------------------------------------------------------------------------------------- comparison


def _cells(report: dict | None, lang: str) -> str:
    """``final | change (verdict)`` of one language in one mode's report."""
    v = report["languages"].get(lang) if report else None
    return f"{v['final']:.3f} | {v['relative_change'] * 100:+.1f}% ({v['verdict']})" if v else "- | -"


def _pair_cell(naive: dict | None, vallex: dict | None, key: str, fmt: str) -> str:
    """``step 0 -> naive / vallex`` of text gain or PER (``-`` where a run did not measure it)."""

    def f(x):
        return "-" if x is None else fmt.format(x)

    n, v = (naive or {}).get(key) or {}, (vallex or {}).get(key) or {}
    if not n and not v:
        return "-"
    cell = f"{f(v.get('baseline', n.get('baseline')))} → {f(n.get('final'))} / {f(v.get('final'))}"
    floor = v.get("floor", n.get("floor"))
    return cell + (f" (floor {f(floor)})" if key == "per" and floor is not None else "")


def comparison_table(naive: dict, vallex: dict) -> str:
    """Markdown: each language's baseline, its final value and change in both modes; and, where the runs
    measured them, its text gain and synthesized PER at step 0 and at the end of each mode."""
    langs = {**naive["languages"], **vallex["languages"]}
    gain = any("text_gain" in v for r in (naive, vallex) for v in r["languages"].values())
    per = any("per" in v for r in (naive, vallex) for v in r["languages"].values())
    head = "| language | role | baseline (step 0) | naive: final | naive: change | vallex: final | vallex: change |"
    rule = "|---|---|---:|---:|---:|---:|---:|"
    if gain:
        head, rule = head + " text gain: step 0 → naive / vallex |", rule + "---:|"
    if per:
        head, rule = head + " synthesized PER: step 0 → naive / vallex |", rule + "---:|"
    rows = [head, rule]
    for lang in langs:
        v, n = vallex["languages"].get(lang), naive["languages"].get(lang)
        either = v or n
        row = f"| {lang} | {either['role']} | {either['baseline']:.3f} | {_cells(naive, lang)} | {_cells(vallex, lang)} |"
        if gain:
            row += f" {_pair_cell(n, v, 'text_gain', '{:.3f}')} |"
        if per:
            row += f" {_pair_cell(n, v, 'per', '{:.0%}')} |"
        rows.append(row)
    guard = (
        f"| guard | | | | {naive['guard'].get('verdict', '-')} | | {vallex['guard'].get('verdict', '-')} |"
    )
    rows.append(guard + " |" * (int(gain) + int(per)))
    return "\n".join(rows)


def write_comparison(
    reports: dict[str, dict],
    out: str | os.PathLike,
    *,
    figure: str | os.PathLike | None = None,
    minutes: float,
) -> bool:
    """``<out>/comparison.md`` (the table), ``comparison.json`` (both reports) and ``add_language.png``
    (copied to ``figure`` too); returns whether vallex kept the old languages and naive forgot them."""
    out = Path(out)
    naive, vallex = reports["naive"], reports["vallex"]
    table = comparison_table(naive, vallex)
    written = out / COMPARISON_FIGURE
    plot_forgetting([naive, vallex], written)
    if figure:
        Path(figure).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(written, figure)
    metric = METRIC_NAMES[vallex["metric"]]
    steps = vallex["final_step"]
    measured = {
        k for r in (naive, vallex) for v in r["languages"].values() for k in ("text_gain", "per") if k in v
    }
    notes = (
        f"Validation {metric} of each language at step 0 of the add-language runs (the base model) and after "
        f"{steps} steps; change relative to step 0; verdicts against the guard's limit. "
        + (
            "Text gain: AR loss with another utterance's phonemes minus with its own (nats/frame; 0 = the "
            "model ignores its text). "
            if "text_gain" in measured
            else ""
        )
        + (
            "Synthesized PER: the recognizer's phoneme error rate on synthesized speech. "
            if "per" in measured
            else "No synthesized PER: no recognizer beside the shards, or train.intelligibility.per_utterances=0. "
        )
        + f"{minutes:.1f} min in all.\n"
    )
    write_text(out / "comparison.md", f"{notes}\n{table}\n")
    write_text(out / "comparison.json", json.dumps(reports, indent=2))
    log.info("add-language comparison (%.1f min):\n%s", minutes, table)
    log.info("wrote %s, %s%s", out / "comparison.md", written, f" and {figure}" if figure else "")
    shown = vallex["verdict"] == "ok" and naive["verdict"] == "forgetting"
    if not shown:
        log.warning(
            "WARNING: this run did not show the expected contrast (naive %s, vallex %s)",
            naive["verdict"],
            vallex["verdict"],
        )
    return shown


# -------------------------------------------------------------------------------------------- demo


def _demo_corpora(cfg: Config, out: Path, new: list[str] | None):
    """Demo steps 1-2: the demo corpus, the old languages prepared alone (the base model's corpus) and
    a copy with the new ones appended; ``(old, new, base_prep, full_prep)``."""
    from vallex.data.demo_corpus import make_demo_corpus
    from vallex.data.prepare import prepare_corpus, summary_table
    from vallex.data.sources import read_manifest

    log.info("== 1/6: demo corpus (espeak-ng speech, cached in %s)", out / "corpus")
    utts = read_manifest(make_demo_corpus(out / "corpus", seed=cfg.run.seed, scale=cfg.corpus.demo_scale))
    sizes: dict[str, int] = {}
    for u in utts:
        sizes[u.language] = sizes.get(u.language, 0) + 1
    new = new or [min(sizes, key=sizes.get)]
    unknown = sorted(set(new) - set(sizes))
    if unknown:
        raise AddLanguageError(f"--new {unknown}: not demo languages (the demo has {sorted(sizes)})")
    old = sorted(set(sizes) - set(new))
    log.info("utterances per language %s: base model on %s, then add %s", sizes, old, new)

    log.info("== 2/6: prepare the old languages, then add the new one to a copy (its symbols are appended)")
    base_prep, full_prep = out / "prepare-base", out / "prepare"
    earlier = base_prep / "manifest.json"
    if earlier.exists() and set(json.loads(earlier.read_text())["languages"]) != set(old):
        _fresh(base_prep)  # an earlier demo with another --new: its table must not leak into this base
    prepare_corpus(
        [u for u in utts if u.language in old],
        base_prep,
        cfg.prepare,
        seed=cfg.run.seed,
        valid_fraction=cfg.corpus.valid_fraction,
    )
    _fresh(full_prep)
    shutil.copytree(base_prep, full_prep)
    manifest = prepare_corpus(
        [u for u in utts if u.language in new],
        full_prep,
        cfg.prepare,
        seed=cfg.run.seed,
        valid_fraction=cfg.corpus.valid_fraction,
    )
    log.info("prepared corpus in %s:\n%s", full_prep, summary_table(manifest))
    return old, new, base_prep, full_prep


def add_language_demo(
    cfg: Config,
    *,
    out: str | os.PathLike = DEMO_OUT,
    new: list[str] | None = None,
    base_steps: int = DEMO_BASE_STEPS,
    add_steps: int = DEMO_ADD_STEPS,
    replay_ratio: float | None = None,
    figure: str | os.PathLike | None = DEMO_FIGURE,
) -> bool:
    """The headline comparison on the embedded demo corpus, under ``out``: train a base model on every
    demo language but ``new`` (default: the smallest), add ``new`` naively and with vallex from that same
    base (:func:`compare_add_language`), write comparison.md/.json and the figure (also copied to
    ``figure``). Returns whether the expected contrast showed."""
    if cfg.corpus.source != "demo":
        raise AddLanguageError(
            f"--demo uses the embedded demo corpus; corpus.source is {cfg.corpus.source!r}"
        )
    from vallex.runtime import init_ray

    out = Path(out)
    t0 = time.time()
    init_ray()  # preparation (Ray Data), the recognizer and the runs (Ray Train) all need it
    old, new, base_prep, full_prep = _demo_corpora(cfg, out, new)
    add_cfg = derive_config(
        cfg,
        {
            "run.prepared_dir": str(full_prep),
            "corpus.languages": [],
            "train.max_steps": add_steps,
            "train.eval_every": max(1, add_steps // 10),
            "train.checkpoint_every": add_steps,
            "train.storage_path": "",
        },
    )
    if cfg.train.intelligibility.per_utterances > 0:
        from vallex.eval.recognizer import ensure_recognizer

        log.info("== 3/6: the phoneme recognizer that scores synthesized speech, on every language")
        ensure_recognizer(add_cfg)
    log.info("== 4/6: train the base model on %s (%d steps)", old, base_steps)
    base_report = train_base(cfg, out=out / "base", prepared_dir=base_prep, languages=old, steps=base_steps)
    log.info("== 5-6/6: add %s naively and with vallex", new)
    plans = plan_comparison(
        add_cfg, base=base_report["model_file"], new_languages=new, out=out, replay_ratio=replay_ratio
    )
    _, shown = compare_add_language(plans, out, figure=figure, fresh=True, started=t0)
    return shown


# ------------------------------------------------------------------------------------ command line


@dataclass
class AddLanguageCommand:
    """What ``ray_jobs/add_language.py`` was asked (its options; ``--help`` documents each)."""

    base: str | None = None
    base_vocab: str | None = None
    new: list[str] = field(default_factory=list)
    naive: bool = False
    compare: bool = False
    demo: bool = False
    replay_ratio: float | None = None
    out: str | None = None
    base_steps: int | None = None
    add_steps: int | None = None
    figure: str | None = None

    def problem(self) -> str | None:
        """What is wrong with the combination of options, or None."""
        if self.demo and (self.naive or self.compare):
            return "--demo already runs both modes: drop --naive/--compare"
        if self.naive and self.compare:
            return "--compare runs both modes: drop --naive"
        if not self.demo and not (self.base and self.new):
            return "--base FILE and --new LANGS are required (or --demo); see --help"
        return None

    def out_dir(self, cfg: Config) -> Path:
        if self.out:
            return Path(self.out)
        if self.demo:
            return Path(DEMO_OUT)
        what = "compare" if self.compare else "naive" if self.naive else "vallex"
        return cfg.output_dir / f"add-{'-'.join(sorted(self.new))}-{what}"


def run_command(cfg: Config, cmd: AddLanguageCommand) -> int:
    """Run what the command line asked; the exit status: 0 when the old languages stayed within the
    guard's limit (``--compare``/``--demo``: when the vallex run kept them and the naive one did not), 1
    otherwise, 2 for a request that cannot work (found before anything trains)."""
    from vallex.logs import setup_logging
    from vallex.runtime import init_ray

    problem = cmd.problem()
    if problem:
        print(f"add_language.py: {problem}", file=sys.stderr)
        return 2
    out = cmd.out_dir(cfg)
    setup_logging(out / "logs" / "add_language.log")
    if not cmd.demo and (cmd.base_steps is not None or cmd.add_steps is not None):
        log.warning("--base-steps/--add-steps apply to --demo only; train.max_steps sets the steps")
    if cmd.demo:
        try:
            shown = add_language_demo(
                cfg,
                out=out,
                new=cmd.new,
                base_steps=DEMO_BASE_STEPS if cmd.base_steps is None else cmd.base_steps,
                add_steps=DEMO_ADD_STEPS if cmd.add_steps is None else cmd.add_steps,
                replay_ratio=cmd.replay_ratio,
                figure=cmd.figure or DEMO_FIGURE,
            )
        except AddLanguageError as e:
            log.error("add_language.py: %s", e)
            return 2
        return 0 if shown else 1
    try:  # every check before Ray starts: the base model, the prepared corpus, the languages, the weights
        request = dict(
            base=cmd.base, new_languages=cmd.new, replay_ratio=cmd.replay_ratio, base_vocab=cmd.base_vocab
        )
        if cmd.compare:
            plans = plan_comparison(cfg, out=out, **request)
        else:
            plan = plan_add_language(cfg, out_dir=out, mode="naive" if cmd.naive else "vallex", **request)
    except (ValueError, FileNotFoundError) as e:  # AddLanguageError, CorpusError, CheckpointError, ...
        log.error("add_language.py: %s", e)
        return 2
    if cmd.figure and not cmd.compare:
        log.warning("--figure applies to --compare and --demo only")
    init_ray()
    if cmd.compare:
        return 0 if compare_add_language(plans, out, figure=cmd.figure)[1] else 1
    return 0 if add_language(plan)["verdict"] == "ok" else 1
