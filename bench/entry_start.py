"""An entry point's command-line parsing (``vallex.cli.parse_config``), with the config keys' ``--help``
listing built only for ``--help`` (now) and built at every start (before: the baseline), in one command.

    .venv/bin/python bench/entry_start.py              # 7 rounds
    .venv/bin/python bench/entry_start.py --rounds 15

The listing reads each config dataclass's field docstrings from ``vallex/config.py``'s source
(``inspect.getsource`` parses the whole file once per class). The baseline is parse_config plus that
listing, which is what parse_config computed eagerly before; the two alternate within each round, so
machine load hits both alike, and the first call of each (imports, caches) is left out. The figure to
read is the ratio of the medians.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

from vallex.cli import parse_config
from vallex.config import config_help

SECTIONS = ("run", "corpus", "prepare", "recognizer", "data", "model", "train")
JOB = str(Path(__file__).resolve().parents[1] / "job.yaml")


def _parse(with_listing: bool) -> float:
    t0 = time.perf_counter()
    parse_config("bench", sections=SECTIONS, argv=["--config", JOB, "train.max_steps=3"])
    if with_listing:
        config_help(sections=SECTIONS)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    _parse(True), _parse(False)  # warm: imports and the YAML loader
    eager, lazy = [], []
    for _ in range(args.rounds):
        eager.append(_parse(True))
        lazy.append(_parse(False))
    e, z = statistics.median(eager), statistics.median(lazy)
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print(
        f"parse_config + --help listing (before): median {e * 1000:.1f} ms  {[round(x * 1000) for x in eager]}"
    )
    print(
        f"parse_config, listing on --help only  : median {z * 1000:.1f} ms  {[round(x * 1000) for x in lazy]}"
    )
    print(f"ratio: {e / z:.1f}x faster")


if __name__ == "__main__":
    main()
