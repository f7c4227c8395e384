"""Add a language to a trained vallex model without forgetting the others.

    python ray_jobs/add_language.py --config job.yaml --base runs/base/train/model.pt --new ar \\
        [--replay-ratio 0.5] [--out DIR] [key.sub=value ...]
    python ray_jobs/add_language.py --config job.yaml --base ... --new ar --naive
    python ray_jobs/add_language.py --config job.yaml --base ... --new ar --compare   (naive vs vallex)
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
  --compare            add --new to --base twice, naively (<out>/naive) and with vallex (<out>/vallex), and
                       write the comparison: <out>/comparison.md (loss, text gain and synthesized PER per
                       language, step 0 vs each mode's end), comparison.json and add_language.png.
  --demo               the headline result on the embedded demo corpus, under --out (default
                       runs/add_language): train a base model on every demo language but the smallest
                       (--new overrides which), add it naively and with vallex from that same base, and write
                       the comparison table (comparison.md) and figure (also copied to --figure). The phoneme
                       recognizer that scores synthesized speech is trained first (on all demo languages).
  --base-steps N       demo: training steps of the base model (default 900: it reads its text after ~300)
  --add-steps N        demo: training steps of each add-language run (default 300); otherwise train.max_steps
  --figure FILE        --compare/--demo: where to copy the comparison figure (demo default docs/add_language.png)

Library: vallex.train.add_language (plan, run, forgetting report) and vallex.train.add_language_compare
(the comparison, the demo, this command). The exit status is 0 when the old languages stayed within the
guard's limit (--compare/--demo: when the vallex run kept them and the naive one did not), 1 otherwise,
2 for a bad command line or config.
"""

from __future__ import annotations

import argparse
import sys

from vallex.cli import parse_config

SECTIONS = ("run", "corpus", "prepare", "recognizer", "data", "model", "train")


def _options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False, prog="add_language.py")
    p.add_argument("--base")
    p.add_argument("--base-vocab")
    p.add_argument("--new", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], default=[])
    p.add_argument("--naive", action="store_true")
    p.add_argument("--compare", action="store_true")
    p.add_argument("--demo", action="store_true")
    p.add_argument("--replay-ratio", type=float)
    p.add_argument("--out")
    p.add_argument("--base-steps", type=int)
    p.add_argument("--add-steps", type=int)
    p.add_argument("--figure")
    return p


def main(argv: list[str] | None = None) -> int:
    opts, rest = _options().parse_known_args(sys.argv[1:] if argv is None else list(argv))
    cfg, _ = parse_config(__doc__, sections=SECTIONS, argv=rest)  # prints --help (this text) and exits
    from vallex.train.add_language_compare import AddLanguageCommand, run_command

    return run_command(cfg, AddLanguageCommand(**vars(opts)))


if __name__ == "__main__":
    sys.exit(main())
