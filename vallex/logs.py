"""Logging: one compact console stream for people, Ray's internal chatter routed to a file."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

# Loggers whose INFO/WARNING output is framework noise on a small machine (e.g. Train V2 repeating
# "Failed to query Ray Train Controller actor state"). They still reach the log file.
NOISY_LOGGERS = ("ray", "ray.train", "ray.data", "ray.tune", "ray.air", "deepspeed", "DeepSpeed", "filelock")


def _file_keeps(record: logging.LogRecord) -> bool:
    """The log file keeps vallex's DEBUG records and every library's INFO and above (matplotlib alone
    writes a few hundred font-matching lines per figure at DEBUG)."""
    return record.levelno >= logging.INFO or record.name == "vallex" or record.name.startswith("vallex.")


def setup_logging(log_file: str | os.PathLike | None = None, level: int = logging.INFO) -> logging.Logger:
    """Console: vallex messages only, one line each. File (if given): vallex's records at DEBUG, every
    library's at INFO and above."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_vallex", False):
            root.removeHandler(h)
    root.setLevel(logging.DEBUG)

    console = logging.StreamHandler(sys.stderr)
    console.setLevel(level)
    console.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    console.addFilter(lambda r: r.name.startswith("vallex") or r.levelno >= logging.ERROR)
    console._vallex = True  # type: ignore[attr-defined]
    root.addHandler(console)

    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        fh.addFilter(_file_keeps)
        fh._vallex = True  # type: ignore[attr-defined]
        root.addHandler(fh)

    logging.captureWarnings(True)  # library deprecation warnings go to the log file, not the terminal
    route_framework_logs()
    return logging.getLogger("vallex")


def route_framework_logs() -> None:
    """Take the frameworks' console handlers off; their records reach our log file through the root.

    Ray and Ray Data install stderr handlers when imported (Ray Data also keeps its own file,
    ``ray-data.log`` in the Ray session's logs), so call this again after importing them.
    """
    import ray.data  # noqa: F401  (its import configures the ray.data loggers we adjust here)

    for name in NOISY_LOGGERS:
        lg = logging.getLogger(name)
        lg.propagate = True
        for h in list(lg.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                lg.removeHandler(h)
