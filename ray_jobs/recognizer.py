"""Train the phoneme recognizer that scores intelligibility, on a prepared corpus (a Ray task).

    python ray_jobs/recognizer.py --config job.yaml
    python ray_jobs/recognizer.py --config job.yaml recognizer.steps=3000 run.prepared_dir=s3://bucket/corpus

A small CTC model (code embeddings -> conv -> 4-layer transformer) learns every language's phonemes from the
ground-truth codes of the prepared train splits. It is saved beside the shards as recognizer.pt
(replacing an older one) with each language's validation phoneme error rate, printed at the end: that
PER is the floor an evaluation of synthesized speech is compared with. Training finds it there.
"""

from __future__ import annotations

import sys

from vallex.cli import parse_config
from vallex.logs import setup_logging
from vallex.runtime import init_ray


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_config(__doc__, sections=("run", "recognizer"), argv=argv)
    setup_logging(cfg.output_dir / "logs" / "recognizer.log")
    init_ray()
    from vallex.eval.recognizer import train_recognizer_on_ray

    train_recognizer_on_ray(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
