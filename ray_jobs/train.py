"""Train a multilingual VALL-E X model with Ray Train + DeepSpeed on a prepared corpus.

    python ray_jobs/train.py --config job.yaml
    python ray_jobs/train.py --config job.yaml train.max_steps=20 data.weights=uniform

Every language is trained together, mixed by data.weights; each evaluation prints one line with every
language's validation loss and writes it to <run.output_dir>/train/metrics.jsonl. Re-running the
same run (same run.name and storage) resumes from its latest checkpoint.
"""

from __future__ import annotations

import sys

from vallex.cli import parse_config
from vallex.logs import setup_logging
from vallex.runtime import init_ray


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_config(__doc__, sections=("run", "data", "model", "train"), argv=argv)
    setup_logging(cfg.output_dir / "logs" / "train.log")
    from vallex.train.plan import plan_run

    plan = plan_run(cfg)  # languages, weights, model: checked before a cluster is started
    init_ray()
    from vallex.train.trainer import train

    train(cfg, plan=plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
