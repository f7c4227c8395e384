"""Searching the language sampling weights with Ray Tune (``ray_jobs/tune.py``).

- :mod:`vallex.tune.objective`: one number from the per-language validation losses (what is minimized);
- :mod:`vallex.tune.space`: search spaces over the weight simplex;
- :mod:`vallex.tune.search`: the trials (short Ray Train runs), baselines, outputs, resume.
"""
