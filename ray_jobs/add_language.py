"""Add a language to a trained vallex model without forgetting the others.

    python ray_jobs/add_language.py --config job.yaml --base runs/base/train/model.pt --new ar \\
        [--replay-ratio 0.5] [--out DIR] [key.sub=value ...]
    python ray_jobs/add_language.py --config job.yaml --base ... --new ar --naive
    python ray_jobs/add_language.py --demo              (the headline comparison; make add-language-demo)

Steps: evaluate every language the model knows on its validation split (step 0: the baseline) ->
grow the AR/NAR language embeddings (and the phoneme embeddings if the new language brings new
symbols; old rows untouched) -> train on a mix of the new and old languages with the forgetting guard
on (Ray Data + Ray Train + DeepSpeed) -> evaluate again. Writes <out>/forgetting_report.json (per
language: baseline, final loss, relative change, verdict; the new language's curve; the guard's
verdict), <out>/forgetting.png, and the run's usual files under <out>/train/.

options (before or after the key=value overrides):
  --base FILE          the trained model: a vallex checkpoint (a run's train/model.pt), or the public VALL-E X
                       vallex-checkpoint.pt (languages en, zh, ja) together with --base-vocab.
  --base-vocab FILE    with a public VALL-E X --base: its tokenizer, utils/g2p/bpe_69.json from the
                       Plachtaa/VALL-E-X repository. Each vallex phoneme symbol starts from the embedding
                       rows of the reference characters that spell it (train.init_vocab); the step-0
                       evaluation of the old languages is then the baseline the guard holds them to.
  --new LANGS          comma-separated ISO codes of the language(s) to add, e.g. ar or ar,ja. Their shards
                       must be in the prepared corpus (run.prepared_dir, else <run.output_dir>/prepare),
                       prepared into the same folder as the old languages' (shared symbol table).
  --naive              train on the new language(s) alone (the recipe that forgets); old ones are evaluated
  --replay-ratio R     the old languages' share of the training stream, in (0, 1); without it data.weights
                       decides (a policy, a map, or a Tune best_weights.json).
  --out DIR            where the run writes (default <run.output_dir>/add-<langs>-<mode>). The same --out
                       again resumes its run from the latest checkpoint.
  --demo               the headline result on the embedded demo corpus, under --out (default
                       runs/add_language): train a base model on every demo language but the smallest
                       (--new overrides which), add it naively and with vallex from that same base, and write
                       the comparison table (comparison.md) and figure (also copied to --figure).
  --base-steps N       demo: training steps of the base model (default 300)
  --add-steps N        demo: training steps of each add-language run (default 300); otherwise train.max_steps
  --figure FILE        demo: where to copy the comparison figure (default docs/add_language.png)

The exit status is 0 when the old languages stayed within the guard's limit (demo: when the vallex run
kept them and the naive one did not), 1 otherwise, 2 for a bad command line or config.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vallex.cli import parse_config
from vallex.files import write_text_atomic
from vallex.logs import setup_logging
from vallex.runtime import init_ray

SECTIONS = ("run", "corpus", "prepare", "data", "model", "train")


def _options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False, prog="add_language.py")
    p.add_argument("--base")
    p.add_argument("--base-vocab")
    p.add_argument("--new", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], default=[])
    p.add_argument("--naive", action="store_true")
    p.add_argument("--replay-ratio", type=float)
    p.add_argument("--out")
    p.add_argument("--demo", action="store_true")
    p.add_argument("--base-steps", type=int, default=300)
    p.add_argument("--add-steps", type=int, default=300)
    p.add_argument("--figure", default="docs/add_language.png")
    return p


def _derive(cfg, **sections):
    """A copy of ``cfg`` with ``{section: {key: value}}`` replaced, validated again."""
    from vallex.config import derive_config

    return derive_config(
        cfg, {f"{section}.{k}": v for section, values in sections.items() for k, v in values.items()}
    )


def _fresh(path: Path) -> None:
    """The demo's runs start over each time (their Ray results too), so its numbers are reproducible."""
    shutil.rmtree(path, ignore_errors=True)


def run_demo(cfg, opts, log) -> int:
    from vallex.data.demo_corpus import make_demo_corpus
    from vallex.data.prepare import prepare_corpus, summary_table
    from vallex.data.sources import read_manifest
    from vallex.train.add_language import (
        AddLanguageError,
        add_language,
        comparison_table,
        plan_add_language,
        plot_forgetting,
    )
    from vallex.train.trainer import train

    if cfg.corpus.source != "demo":
        raise AddLanguageError(
            f"--demo uses the embedded demo corpus; corpus.source is {cfg.corpus.source!r}"
        )
    out = Path(opts.out or "runs/add_language")
    t0 = time.time()

    log.info("== 1/5: demo corpus (espeak-ng speech, cached in %s)", out / "corpus")
    utts = read_manifest(make_demo_corpus(out / "corpus", seed=cfg.run.seed, scale=cfg.corpus.demo_scale))
    sizes: dict[str, int] = {}
    for u in utts:
        sizes[u.language] = sizes.get(u.language, 0) + 1
    new = opts.new or [min(sizes, key=sizes.get)]
    unknown = sorted(set(new) - set(sizes))
    if unknown:
        raise AddLanguageError(f"--new {unknown}: not demo languages (the demo has {sorted(sizes)})")
    old = sorted(set(sizes) - set(new))
    log.info("utterances per language %s: base model on %s, then add %s", sizes, old, new)

    log.info("== 2/5: prepare the old languages, then add the new one to a copy (its symbols are appended)")
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

    log.info("== 3/5: train the base model on %s (%d steps)", old, opts.base_steps)
    _fresh(out / "base")
    base_cfg = _derive(
        cfg,
        run={"output_dir": str(out / "base"), "name": "base", "prepared_dir": str(base_prep)},
        corpus={"languages": []},
        data={"languages": old},
        train={"max_steps": opts.base_steps, "init_from": "", "storage_path": ""},
    )
    base_report = train(base_cfg)
    if not base_report.get("model_file"):
        raise AddLanguageError(f"the base run wrote no model file (see {base_cfg.train_dir / 'report.json'})")

    every = max(1, opts.add_steps // 10)
    add_cfg = _derive(
        cfg,
        run={"prepared_dir": str(full_prep)},
        corpus={"languages": []},
        train={
            "max_steps": opts.add_steps,
            "eval_every": every,
            "checkpoint_every": opts.add_steps,
            "storage_path": "",
        },
    )
    reports = {}
    for i, mode in enumerate(("naive", "vallex")):
        log.info("== %d/5: add %s, %s mode, from the same base", 4 + i, new, mode)
        _fresh(out / mode)
        plan = plan_add_language(
            add_cfg,
            base=base_report["model_file"],
            new_languages=new,
            out_dir=out / mode,
            mode=mode,
            replay_ratio=None if mode == "naive" else opts.replay_ratio,
        )
        reports[mode] = add_language(plan)

    table = comparison_table(reports["naive"], reports["vallex"])
    figure = out / "add_language.png"
    plot_forgetting([reports["naive"], reports["vallex"]], figure)
    if opts.figure:
        Path(opts.figure).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(figure, opts.figure)
    minutes = (time.time() - t0) / 60
    write_text_atomic(
        out / "comparison.md",
        f"Validation loss (AR + NAR) of each language, step 0 of the add-language run (the base model) vs. "
        f"after {opts.add_steps} steps; change relative to step 0; whole demo {minutes:.1f} min.\n\n{table}\n",
    )
    write_text_atomic(out / "comparison.json", json.dumps(reports, indent=2))
    log.info("add-language demo finished in %.1f min:\n%s", minutes, table)
    log.info("wrote %s, %s%s", out / "comparison.md", figure, f" and {opts.figure}" if opts.figure else "")
    shown = reports["vallex"]["verdict"] == "ok" and reports["naive"]["verdict"] == "forgetting"
    if not shown:
        log.warning(
            "WARNING: this run did not show the expected contrast (naive %s, vallex %s)",
            reports["naive"]["verdict"],
            reports["vallex"]["verdict"],
        )
    return 0 if shown else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    opts, rest = _options().parse_known_args(argv)
    cfg, _ = parse_config(__doc__, sections=SECTIONS, argv=rest)  # prints --help (this text) and exits
    mode = "naive" if opts.naive else "vallex"
    if opts.demo:
        out = Path(opts.out or "runs/add_language")
    else:
        if not opts.base or not opts.new:
            print(
                "add_language.py: --base FILE and --new LANGS are required (or --demo); see --help",
                file=sys.stderr,
            )
            return 2
        out = Path(opts.out or cfg.output_dir / f"add-{'-'.join(sorted(opts.new))}-{mode}")
    log = setup_logging(out / "logs" / "add_language.log")

    from vallex.train.add_language import AddLanguageError, add_language, plan_add_language

    if opts.demo:
        init_ray()
        try:
            return run_demo(cfg, opts, log)
        except AddLanguageError as e:
            log.error("add_language.py: %s", e)
            return 2
    if opts.add_steps != 300 or opts.base_steps != 300:
        log.warning("--base-steps/--add-steps apply to --demo only; train.max_steps sets the steps")
    try:  # every check before Ray starts: the base model, the prepared corpus, the languages, the weights
        plan = plan_add_language(
            cfg,
            base=opts.base,
            new_languages=opts.new,
            out_dir=out,
            mode=mode,
            replay_ratio=opts.replay_ratio,
            base_vocab=opts.base_vocab,
        )
    except (ValueError, FileNotFoundError) as e:  # AddLanguageError, CorpusError, CheckpointError, ...
        log.error("add_language.py: %s", e)
        return 2
    init_ray()
    report = add_language(plan)
    return 0 if report["verdict"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
