"""The whole vallex path on the embedded demo corpus, on a local Ray cluster (what `make demo` runs).

    python ray_jobs/demo.py --config job.yaml [key=value ...]

1. synthesize a small multilingual corpus with espeak-ng (en, zh, fr and a much smaller ar; cached),
2. prepare it: phonemes + codes -> per-language Parquet shards (Ray Data); job.yaml's codec is fitted to
   the corpus (prepare.codec.kind: mel_rvq) since EnCodec's weights cannot be downloaded offline;
   then a code-level phoneme recognizer beside the shards (trained once; it scores synthesized speech),
3. train a small AR + NAR VALL-E X (job.yaml: 128 wide, 4 layers, on 25 Hz codes) on all languages mixed
   by weights (Ray Train, 2 workers, DeepSpeed ZeRO-2),
4. print each language's validation loss, text gain and synthesized PER at the first and last evaluation.

Files: <run.output_dir>/prepare/manifest.json, <run.output_dir>/train/{metrics.jsonl, report.json, valid_loss.png}.
"""

from __future__ import annotations

import sys
import time

from vallex.cli import parse_config
from vallex.logs import setup_logging
from vallex.runtime import init_ray


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_config(
        __doc__, sections=("run", "corpus", "prepare", "recognizer", "data", "model", "train"), argv=argv
    )
    log = setup_logging(cfg.output_dir / "logs" / "demo.log")
    t0 = time.time()
    init_ray()
    from vallex.data.prepare import prepare_from_config, summary_table
    from vallex.eval.recognizer import ensure_recognizer
    from vallex.train.trainer import train

    log.info("== 1-2/3: demo corpus and preparation")
    manifest = prepare_from_config(cfg)
    log.info("prepared corpus in %s:\n%s", cfg.prepared_dir, summary_table(manifest))
    if cfg.train.intelligibility.per_utterances > 0:
        log.info("== 2/3: the phoneme recognizer that scores synthesized speech (once per corpus)")
        ensure_recognizer(cfg)
    log.info("== 3/3: training on every language together")
    report = train(cfg)
    falling = {lang: v["last"]["loss"] < v["first"]["loss"] for lang, v in report["languages"].items()}
    log.info(
        "demo finished in %.1f min; validation loss fell for %d/%d languages",
        (time.time() - t0) / 60,
        sum(falling.values()),
        len(falling),
    )
    return 0 if all(falling.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
