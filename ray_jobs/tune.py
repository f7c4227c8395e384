"""Search the language sampling weights with Ray Tune, so every language's validation loss stays balanced.

    python ray_jobs/tune.py --config job.yaml
    python ray_jobs/tune.py --config job.yaml tune.num_samples=16 tune.max_steps_per_trial=200
    python ray_jobs/tune.py --config job.yaml tune.scheduler=pbt tune.num_samples=4 tune.pbt_interval=50
    python ray_jobs/train.py --config job.yaml data.weights=runs/demo/tune/best_weights.json

Each trial is a short Ray Train + DeepSpeed run (train.*, with tune.max_steps_per_trial steps) on the
prepared corpus with the trial's weights; by default Optuna's TPE proposes the weights and ASHA stops
trials that trail. The baselines (uniform, proportional, temperature alpha=0.3, unimax) and one reference
run per language get the same budget. Writes <run.output_dir>/tune/best_weights.json (pass it to
data.weights), trials.csv and tune_losses.png. Re-running the same command resumes an interrupted search.
With tune.scheduler=pbt the trials are a population trained in segments of tune.pbt_interval steps: at
each segment's end the worst clone a better trial's checkpoint and train on with perturbed weights; each
trial's weight schedule is in pbt_schedules.json (and .png), best_weights.json adds the best's schedule
and model.
"""

from __future__ import annotations

import logging
import sys

from vallex.cli import parse_config
from vallex.logs import setup_logging
from vallex.runtime import init_ray


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_config(__doc__, sections=("run", "data", "model", "train", "tune"), argv=argv)
    setup_logging(cfg.output_dir / "logs" / "tune.log")
    init_ray()
    from vallex.tune.search import SearchInterrupted, run_search
    from vallex.tune.state_check import UnsafeTuneStateError

    try:
        run_search(cfg)
    except SearchInterrupted as e:
        logging.getLogger("vallex.tune").warning("WARNING: %s", e)
        return 130
    except UnsafeTuneStateError as e:  # its saved state holds pickles that could run code: nothing was loaded
        logging.getLogger("vallex.tune").error("ERROR: %s", e)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
