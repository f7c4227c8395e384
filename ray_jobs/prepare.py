"""Prepare a corpus: phonemes + EnCodec tokens -> per-language Parquet shards (Ray tasks and actors).

    python ray_jobs/prepare.py --config job.yaml
    python ray_jobs/prepare.py --config job.yaml corpus.source=/data/my_manifest.jsonl run.output_dir=runs/mine
    python ray_jobs/prepare.py --config job.yaml corpus.source=/data/LJSpeech-1.1 corpus.language=en
    python ray_jobs/prepare.py --config job.yaml corpus.source=/data/cv-corpus-17.0/fr   # Common Voice

corpus.source is a manifest file (JSONL/CSV), an LJSpeech-style folder (metadata.csv + wavs/) or a Common
Voice folder (validated.tsv + clips/); corpus.layout forces one when detection is not wanted.

Output: <run.output_dir>/prepare/{manifest.json, symbols.json, <lang>/part-NNNNN.parquet}, or
run.prepared_dir (a folder, or a bucket: run.prepared_dir=s3://bucket/prefix). Re-running skips
finished shards; adding a language to an existing output writes only its shards.
"""

from __future__ import annotations

import sys

from vallex.cli import parse_config
from vallex.logs import setup_logging
from vallex.runtime import init_ray


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_config(__doc__, sections=("run", "corpus", "prepare"), argv=argv)
    log = setup_logging(cfg.output_dir / "logs" / "prepare.log")
    init_ray()
    from vallex.data.prepare import prepare_from_config, summary_table

    manifest = prepare_from_config(cfg)
    log.info("prepared corpus in %s:\n%s", cfg.prepared_dir, summary_table(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
